"""The retrieval service through HTTP on 127.0.0.1: exact top-k against brute force over
/v1/embed vectors (1 and 3 shards), real batching, live reconfiguration, every bad-input case,
auth, durability across an application restart and the loss of a shard replica.

Two applications share one Serve instance on the session's Ray: "s3" (3 shards, no auth) and
"s1" (1 shard with 2 replicas, bearer token). Both are deleted at the end of the module.
"""

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

TOKEN = "test-token-123"
MAX_K = 100
BODY_LIMIT = 64 * 1024
APPS = {"s3": 3, "s1": 1}  # app name -> shards
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(index_dir: Path, name: str, **overrides) -> dict:
    """Small CPU reservations: the session's Ray has 4 CPUs and other tests share it."""
    args = {
        "index_dir": str(index_dir),
        "max_k": MAX_K,
        "max_body_bytes": BODY_LIMIT,
        "batch_wait_timeout_s": 0.05,
        "embedder_num_cpus": 0.5,
        "ingress_num_cpus": 0.2,
        "shard_num_cpus": 0.1,
        "auth_token": TOKEN if name == "s1" else "",
        "shard_replicas": 2 if name == "s1" else 1,
        # s1: docs behind the token, no paths in results; s3: public docs, relative paths, and
        # a short write lock wait so that a held lock fails a write quickly.
        "docs_public": name != "s1",
        "metadata_path": "omit" if name == "s1" else "relative",
        "write_timeout_s": 2.0,
    }
    args.update(overrides)
    return args


def all_args(index_dirs: dict[str, Path]) -> dict[str, dict]:
    return {name: app_args(index_dirs[name], name) for name in APPS}


def deploy(apps: dict[str, dict], embedder_config: dict | None = None) -> None:
    """Deploy the test apps as `serve deploy` does: a config with import path and args (the
    declarative API, where a change of `user_config` alone reconfigures running replicas)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": []}
    for name, args in apps.items():
        app = {
            "name": f"reid-test-{name}",
            "route_prefix": f"/reid-test-{name}",
            "import_path": "serve_apps.retrieval:build_app",
            "args": args,
        }
        if embedder_config and name in embedder_config:
            app["deployments"] = [{"name": "Embedder", "user_config": embedder_config[name]}]
        config["applications"].append(app)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 240
    while True:
        statuses = {n: serve.status().applications.get(f"reid-test-{n}") for n in apps}
        if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
            return
        failed = [s.message for s in statuses.values() if s is not None and "FAIL" in s.status]
        assert not failed and time.monotonic() < deadline, failed or statuses
        time.sleep(0.5)


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    directory = tmp_path_factory.mktemp("serve") / "checkpoint"
    return save_checkpoint(directory, build_model(config.model, num_classes=12), config, 0)


@pytest.fixture(scope="module")
def gallery(tiny_market, checkpoint) -> SimpleNamespace:
    """The tiny Market gallery embedded in-process (test_build_index covers Ray Data)."""
    from reid_platform.checkpoint import load_model
    from reid_platform.evaluation.embed import extract_features
    from reid_platform.retrieval.gallery import gallery_samples, sample_metadata

    samples, _ = gallery_samples(tiny_market)
    model, config = load_model(checkpoint)
    features = extract_features(model, samples, config.data.height, config.data.width)
    assert len(features.indices) == len(samples)
    return SimpleNamespace(
        ids=[s.item_id for s in samples],
        vectors=features.feats,
        metadata=[sample_metadata(s) for s in samples],
    )


@pytest.fixture(scope="module")
def index_dirs(tmp_path_factory, gallery, checkpoint, tiny_market) -> dict[str, Path]:
    from reid_platform.retrieval import ShardedIndex

    out = {}
    extra = {"checkpoint": str(checkpoint), "gallery": str(tiny_market)}  # as build_index
    for name, shards in APPS.items():
        path = tmp_path_factory.mktemp("serve") / f"index-{name}"
        with ShardedIndex.create(path, gallery.vectors.shape[1], shards, extra=extra) as index:
            index.add(gallery.ids, gallery.vectors, gallery.metadata)
            index.save()
        out[name] = path
    return out


@pytest.fixture(scope="module")
def serve_port(ray_session) -> int:
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    # Serve may already run for another module: ask it which port it listens on.
    http = ray_session.get(_get_global_client()._controller.get_http_config.remote())
    assert http.host == "127.0.0.1"
    return http.port


@pytest.fixture(scope="module")
def apps(ray_session, serve_port, index_dirs):
    from ray import serve

    deploy(all_args(index_dirs))
    yield
    for name in APPS:
        serve.delete(f"reid-test-{name}")


@pytest.fixture(scope="module")
def clients(apps, serve_port):
    made = {}
    for name in APPS:
        headers = {"Authorization": f"Bearer {TOKEN}"} if name == "s1" else {}
        made[name] = httpx.Client(
            base_url=f"http://127.0.0.1:{serve_port}/reid-test-{name}",
            headers=headers,
            timeout=60.0,
        )
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def query_images(tiny_market) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tiny_market / "query").iterdir())[:5]]


# ---- helpers -----------------------------------------------------------------------------


def embed(client: httpx.Client, image: bytes) -> np.ndarray:
    response = client.post("/v1/embed", files={"image": image})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == len(body["embedding"])
    return np.asarray(body["embedding"], dtype=np.float32)


def search(client: httpx.Client, image: bytes, k: int) -> list[dict]:
    response = client.post("/v1/search", files={"image": image}, data={"k": str(k)})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def assert_same_ranking(results: list[dict], ids: list[str], scores: np.ndarray) -> None:
    """Same ids rank by rank, scores within 1e-5; neighbours closer than that may swap."""
    assert len(results) == len(ids)
    got = np.array([r["score"] for r in results])
    np.testing.assert_allclose(got, scores, atol=1e-5)
    assert np.all(np.diff(got) <= 1e-7), "results must be best first"
    for rank, (hit, expected) in enumerate(zip(results, ids)):
        if hit["id"] != expected:  # only a near-tie may reorder
            tied = np.abs(scores - scores[rank]) <= 1e-5
            assert hit["id"] in {ids[j] for j in np.flatnonzero(tied)}, (rank, hit, expected)


def wait_until(check, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def kill_one_replica(ray_session, app: str, deployment: str) -> None:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(
        a["name"]
        for a in ray_session.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )
    assert names, f"no replica of {app}/{deployment}"
    ray_session.kill(ray_session.get_actor(names[0], namespace="serve"), no_restart=True)


# ---- arguments and config (no Ray) -------------------------------------------------------


def test_args_are_typed_and_token_defaults_to_env(monkeypatch):
    from pydantic import ValidationError

    from serve_apps.retrieval import RetrievalArgs

    monkeypatch.setenv("REID_SERVE_TOKEN", "from-env")
    args = RetrievalArgs.model_validate({"index_dir": "/x", "max_k": "7"})
    assert args.max_k == 7 and args.auth_token == "from-env" and args.checkpoint == ""
    assert "from-env" not in repr(args)
    for bad in (
        {"index_dir": "/x", "max_k": 0},
        {"index_dir": "/x", "max_batch_size": 0},
        {"index_dir": "/x", "no_such_arg": 1},
        {},
    ):
        with pytest.raises(ValidationError):
            RetrievalArgs.model_validate(bad)


def test_serve_config_file_listens_on_loopback_8000():
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.retrieval import RetrievalArgs

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "serve_apps" / "retrieval.yaml").read_text())
    )
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    (app,) = config.applications
    assert app.import_path == "serve_apps.retrieval:build_app"
    RetrievalArgs.model_validate(app.args)


# ---- through HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(APPS))
def test_search_equals_brute_force_over_embed(clients, gallery, query_images, name):
    client = clients[name]
    paths = [m["path"] for m in gallery.metadata]
    vectors = np.stack([embed(client, Path(p).read_bytes()) for p in paths])  # (N, D)
    np.testing.assert_allclose(vectors, gallery.vectors, atol=1e-5)  # served == Ray Data
    for n, image in enumerate(query_images):
        query = embed(client, image)
        scores = vectors @ query  # (N,) cosine: both sides are unit vectors
        order = np.argsort(-scores, kind="stable")
        for k in (1, 5, MAX_K):  # MAX_K > N: every item comes back
            results = search(client, image, k)
            top = order[:k]
            assert_same_ranking(results, [gallery.ids[j] for j in top], scores[top])
        if n == 0:
            hit = results[0]
            stored = dict(gallery.metadata[gallery.ids.index(hit["id"])])
            if name == "s1":  # metadata_path "omit"
                del stored["path"]
            else:  # "relative": to the gallery root, never the server's absolute path
                stored["path"] = hit["id"]  # ids are paths relative to the root here
            assert hit["metadata"] == stored
            as_json = client.post(
                "/v1/search", json={"image_b64": base64.b64encode(image).decode(), "k": 3}
            )
            assert as_json.status_code == 200
            assert [r["id"] for r in as_json.json()["results"]] == [r["id"] for r in results[:3]]


def test_stats_and_docs(clients, gallery):
    for name, shards in APPS.items():
        stats = clients[name].get("/v1/stats").json()
        assert len(stats["items_per_shard"]) == shards
        assert stats["count"] == sum(stats["items_per_shard"]) == len(gallery.ids)
        assert stats["index"]["index_type"] == "Flat"
        assert stats["model"]["backbone"] == "test_resnet"
    docs = clients["s3"].get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = clients["s3"].get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/embed", "/v1/gallery", "/v1/stats", "/healthz"} <= set(paths)


def test_embedder_batches_concurrent_requests(clients, query_images):
    client = clients["s3"]
    images = query_images * 5
    singles = [embed(client, image) for image in query_images]
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        batched = list(pool.map(lambda image: embed(client, image), images))
    for n, vector in enumerate(batched):  # batching must not change a result
        np.testing.assert_allclose(vector, singles[n % len(query_images)], atol=1e-5)
    batching = client.get("/v1/stats").json()["batching"]
    assert batching["largest_batch_seen"] > 1, batching


def test_batch_settings_change_live(clients, index_dirs):
    client = clients["s3"]
    before = client.get("/v1/stats").json()["batching"]
    deploy(all_args(index_dirs), {"s3": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}})
    after = wait_until(
        lambda: (b := client.get("/v1/stats").json()["batching"])["max_batch_size"] == 4 and b,
        60,
        "the new batch size",
    )
    assert after["batch_wait_timeout_s"] == 0.02
    # The same replica was reconfigured, not replaced: it remembers its batches.
    assert after["batch_sizes_seen"] == before["batch_sizes_seen"]


def test_bad_input_gets_json_errors_and_service_keeps_serving(clients, query_images):
    client = clients["s3"]
    image = query_images[0]

    def check(response, status: int) -> None:
        assert response.status_code == status, response.text
        assert isinstance(response.json()["detail"], str | list)

    check(client.post("/v1/search", files={"image": b"not an image at all"}), 400)
    check(client.post("/v1/search", files={"image": image[: len(image) // 2]}), 400)
    check(client.post("/v1/embed", files={"image": image[:100]}), 400)
    check(client.post("/v1/search", json={"image_b64": "!!not base64!!"}), 400)
    check(
        client.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"}),
        400,
    )
    check(client.post("/v1/search", files={"image": image + b"\0" * BODY_LIMIT}), 413)
    check(client.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}), 415)
    for k in ("0", str(MAX_K + 1), "-1", "abc"):
        check(client.post("/v1/search", files={"image": image}, data={"k": k}), 422)
    check(
        client.post("/v1/search", json={"image_b64": base64.b64encode(image).decode(), "k": 2.5}),
        422,
    )
    check(client.post("/v1/search", data={"k": "3"}, files={"other": image}), 422)
    check(client.post("/v1/gallery", files={"image": image}), 422)  # no id
    check(client.post("/v1/gallery", files={"image": b"junk"}, data={"id": "x"}), 400)
    check(client.delete("/v1/gallery/no/such/id.jpg"), 404)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert len(search(client, image, 3)) == 3


def test_bearer_token_is_required_when_set(clients, serve_port, query_images):
    open_client = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/reid-test-s1")
    with open_client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for response in (
                open_client.post("/v1/search", files={"image": query_images[0]}, headers=headers),
                open_client.post("/v1/embed", files={"image": query_images[0]}, headers=headers),
                open_client.get("/v1/stats", headers=headers),
                open_client.delete("/v1/gallery/x", headers=headers),
            ):
                assert response.status_code == 401, response.text
                assert "detail" in response.json()
        assert open_client.get("/healthz").status_code == 200
    assert len(search(clients["s1"], query_images[0], 2)) == 2


def test_shard_replicas_agree_and_losing_one_keeps_the_gallery(
    ray_session, clients, gallery, query_images
):
    """s1 has one shard with two replicas: a write through either is seen by both, and after
    one replica is lost the same gallery (with the API's writes) is served."""
    client = clients["s1"]
    image = query_images[1]
    added = client.post(
        "/v1/gallery",
        files={"image": image},
        data={"id": "replica/new.jpg", "metadata": '{"source": "api"}'},
    )
    assert added.status_code == 200, added.text
    for _ in range(6):  # requests spread over both replicas
        assert search(client, image, 1)[0]["id"] == "replica/new.jpg"
    removed = gallery.ids[0]
    assert client.delete(f"/v1/gallery/{removed}").status_code == 200
    for _ in range(6):
        found = {r["id"] for r in search(client, image, MAX_K)}
        assert "replica/new.jpg" in found and removed not in found
    before = search(client, image, MAX_K)
    kill_one_replica(ray_session, "reid-test-s1", "shard_0")
    for _ in range(6):  # the survivor serves; a request caught by the dead one is retried
        assert wait_until(lambda: search(client, image, MAX_K), 60, "a search") == before


def test_writes_survive_restart(clients, index_dirs, gallery, query_images):
    from ray import serve

    client = clients["s3"]
    new = {"api/new-1.jpg": query_images[2], "api/new-2.jpg": query_images[3]}
    response = client.post(
        "/v1/gallery",
        files=[("image", data) for data in new.values()],
        data={"id": list(new), "metadata": [json.dumps({"n": n}) for n in range(len(new))]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"added": list(new), "count": 2}
    top = search(client, new["api/new-1.jpg"], 1)[0]
    assert (top["id"], top["metadata"]) == ("api/new-1.jpg", {"n": 0})
    assert abs(top["score"] - 1.0) < 1e-5
    assert client.delete("/v1/gallery/api/new-2.jpg").json() == {"deleted": "api/new-2.jpg"}
    assert client.delete("/v1/gallery/api/new-2.jpg").status_code == 404
    expected = search(client, query_images[3], MAX_K)
    assert len(expected) == len(gallery.ids) + 1
    counts = client.get("/v1/stats").json()["items_per_shard"]

    serve.delete("reid-test-s3")
    deploy(all_args(index_dirs))
    assert search(client, query_images[3], MAX_K) == expected  # new-1 present, new-2 absent
    assert client.get("/v1/stats").json()["items_per_shard"] == counts
    assert client.delete("/v1/gallery/api/new-2.jpg").status_code == 404
