"""`python -m serve_apps run serve_apps.retrieval:build_app ... http_port=P` end to end, as a
user starts the service: a 4-shard index
on a Ray limited to 2 CPUs comes up healthy (CPU requests sized to the cluster; the old fixed
requests needed 2.5), and every socket of that Ray and its app listens on loopback.

This is the one test that starts a Ray of its own (the entry point under test starts it); it
runs for about a minute beside the session's Ray."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from hardening import is_loopback, listening_sockets, process_tree

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_4_shards_on_2_cpus_listens_on_loopback_only(tmp_path, tiny_market):
    from reid_platform.checkpoint import load_model, save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model
    from reid_platform.retrieval import ShardedIndex

    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    checkpoint = save_checkpoint(tmp_path / "ckpt", build_model(config.model, 12), config, 0)
    dim = load_model(checkpoint)[0].embedding_dim
    vectors = np.random.default_rng(0).standard_normal((40, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with ShardedIndex.create(
        tmp_path / "index", dim, 4, extra={"checkpoint": str(checkpoint)}
    ) as index:
        index.add([f"g{i}.jpg" for i in range(40)], vectors, [{"pid": i} for i in range(40)])
        index.save()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    # A new local Ray even if a `ray start` cluster runs on this machine; 2 CPUs whatever
    # the machine has.
    env.update(RAY_ADDRESS="local", RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": 2}))
    env["REID_PLATFORM_HOME"] = str(tmp_path / "home")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        # the import-path form, on a port of our own (`http_port`: Serve's CLI has no option)
        [sys.executable, "-m", "serve_apps", "run", "serve_apps.retrieval:build_app",
         f"index_dir={tmp_path / 'index'}", f"http_port={port}"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pids: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
            stats = client.get("/v1/stats").json()
            assert stats["items_per_shard"] and len(stats["items_per_shard"]) == 4
            assert stats["count"] == 40
            cpus = stats["resources"]["cpus_per_replica"]
            assert stats["resources"]["cluster_cpus"] == 2.0
            assert cpus["embedder"] + 4 * cpus["shard"] + cpus["ingress"] <= 2.0
            image = next((tiny_market / "query").iterdir()).read_bytes()
            response = client.post("/v1/search", files={"image": image}, data={"k": "5"})
            assert response.status_code == 200 and len(response.json()["results"]) == 5
        pids = process_tree(proc.pid)
        sockets = listening_sockets(pids)
        names = {name for _, _, name in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets
        assert any(s[1] == port for s in sockets)  # the HTTP proxy is among them
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert not exposed, exposed
        print(f"serve run: {len(sockets)} listening sockets, all loopback: {sockets}")
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts down the Ray it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in pids[1:]:  # anything of that Ray still running (only ours: its children)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
