"""Serving throughput and latency of the retrieval service, against the raw model, in one run.

Starts a loopback-only local Ray (or joins $RAY_ADDRESS) and Serve on 127.0.0.1, builds a
random-weight model (`--backbone`) and a sharded Flat index of random unit vectors, then
drives the HTTP API with `--clients` concurrent clients: once with the Embedder batching
(`--max-batch-size`) and once without (max_batch_size 1). In the same run, before Serve starts,
the model's raw batched forward throughput (images/s, batches of `--max-batch-size`, the
Embedder's device and thread count, no HTTP, decode or search) is the baseline.

    python bench/serve_load.py                        # resnet50 at 256x128, 32 clients
    python bench/serve_load.py --endpoint embed       # embedding only, no index search
    python bench/serve_load.py --smoke-test           # tiny model, small load, seconds

Prints one JSON line. Per mode ("batched", "unbatched"):
  qps           successful requests/s over the measured requests
  p50_ms, p99_ms  request latency seen by the clients
  errors        non-200 answers (should be 0)
  mean_batch, largest_batch   Embedder batch sizes during the mode (from /v1/stats)
and raw_model_ips (images/s of model.embed), batched_fraction_of_raw and
unbatched_fraction_of_raw (qps / raw_model_ips: what the service delivers of the model's speed).
The load generator runs in this process: on a small CPU machine it competes with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

import reid_platform  # noqa: E402, F401  (loopback switch before ray is imported)

APP = "serve-load-bench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="timm model (random weights)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--gallery-size", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--endpoint", choices=("search", "embed"), default="search")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=600, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured requests per mode")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--embedder-cpus",
        type=float,
        default=None,
        help="CPUs (and torch threads) of the Embedder; default: half the cores",
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny model and load")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width = "test_resnet", 64, 32
        args.gallery_size, args.clients, args.requests, args.warmup = 500, 8, 48, 8
    if args.embedder_cpus is None:
        args.embedder_cpus = float(max(1, (os.cpu_count() or 2) // 2))
    return args


def make_checkpoint(directory: Path, args: argparse.Namespace):
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    config = Config().replace(
        **{"model.backbone": args.backbone, "data.height": args.height, "data.width": args.width}
    )
    model = build_model(config.model, num_classes=751,
                        input_size=(args.height, args.width)).eval()
    return save_checkpoint(directory / "checkpoint", model, config, epoch=0), model


def raw_images_per_s(model, args: argparse.Namespace, device: str) -> float:
    """model.embed on (max_batch_size, 3, H, W) batches: best of 3 timed runs of >= 1 s."""
    import torch

    model = model.to(device)
    batch = torch.randn(args.max_batch_size, 3, args.height, args.width, device=device)
    best = 0.0
    with torch.inference_mode():
        for _ in range(2):
            model.embed(batch)
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < 1.0:
                model.embed(batch)
                done += len(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, done / (time.perf_counter() - start))
    return best


def make_index(directory: Path, checkpoint: Path, dim: int, args: argparse.Namespace) -> Path:
    from reid_platform.retrieval import ShardedIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.gallery_size, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"g{i:07d}.jpg" for i in range(args.gallery_size)]
    metadata = [{"pid": i % 1000, "camid": i % 6} for i in range(args.gallery_size)]
    out = directory / "index"
    with ShardedIndex.create(
        out, dim, args.shards, "Flat", extra={"checkpoint": str(checkpoint)}
    ) as index:
        index.add(ids, vectors, metadata)
        index.save()
    return out


def jpeg_images(args: argparse.Namespace, count: int = 16) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


async def drive(
    base_url: str, path: str, images: list[bytes], args: argparse.Namespace, total: int
) -> tuple[list[float], int, float]:
    """`total` requests from `args.clients` concurrent clients: (latencies s, errors, wall s)."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued, errors
            while issued < total:
                n = issued
                issued += 1
                data = {"k": str(args.k)} if args.endpoint == "search" else None
                start = time.perf_counter()
                response = await client.post(
                    path, files={"image": images[n % len(images)]}, data=data
                )
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.clients)])
        wall = time.perf_counter() - start
    return latencies, errors, wall


def batch_sizes(client: httpx.Client) -> dict[int, int]:
    seen = client.get("/v1/stats").json()["batching"]["batch_sizes_seen"]
    return {int(size): n for size, n in seen.items()}


def run_mode(base_url: str, images: list[bytes], args: argparse.Namespace) -> dict:
    path = f"/v1/{args.endpoint}"
    asyncio.run(drive(base_url, path, images, args, args.warmup))
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        before = batch_sizes(client)
        latencies, errors, wall = asyncio.run(drive(base_url, path, images, args, args.requests))
        after = batch_sizes(client)
    batches = {s: after.get(s, 0) - before.get(s, 0) for s in after}
    num_batches = sum(batches.values())
    ms = np.array(latencies) * 1000.0
    return {
        "qps": round((len(latencies) - errors) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors,
        "mean_batch": round(sum(s * n for s, n in batches.items()) / max(num_batches, 1), 2),
        "largest_batch": max((s for s, n in batches.items() if n), default=0),
    }


def main() -> None:
    args = parse_args()
    import ray
    import torch
    from ray import serve

    from reid_platform.runtime import init_ray
    from serve_apps.retrieval import RetrievalArgs, build_app

    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    init_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        checkpoint, model = make_checkpoint(Path(tmp), args)
        torch.set_num_threads(max(1, int(args.embedder_cpus)))  # as the Embedder replica
        raw_ips = raw_images_per_s(model, args, device)
        dim = model.embedding_dim
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        index_dir = make_index(Path(tmp), checkpoint, dim, args)
        images = jpeg_images(args)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = f"http://127.0.0.1:{port}/{APP}"
        results = {}
        try:
            for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
                app = build_app(
                    RetrievalArgs(
                        index_dir=str(index_dir),
                        max_batch_size=batch,
                        batch_wait_timeout_s=args.batch_wait_ms / 1000.0 if batch > 1 else 0.0,
                        embedder_num_cpus=args.embedder_cpus,
                        max_k=max(args.k, 10),
                        auth_token="",
                    )
                )
                serve.run(app, name=APP, route_prefix=f"/{APP}")
                results[mode] = run_mode(base_url, images, args)
        finally:
            serve.delete(APP)
    if started_ray:
        ray.shutdown()
    print(
        json.dumps(
            {
                "bench": "serve_load",
                "endpoint": args.endpoint,
                "device": device,
                "backbone": args.backbone,
                "input": [args.height, args.width],
                "gallery_size": args.gallery_size,
                "shards": args.shards,
                "clients": args.clients,
                "requests": args.requests,
                "max_batch_size": args.max_batch_size,
                "embedder_cpus": args.embedder_cpus,
                "batched": results["batched"],
                "unbatched": results["unbatched"],
                "raw_model_ips": round(raw_ips, 2),
                "batched_fraction_of_raw": round(results["batched"]["qps"] / raw_ips, 3),
                "unbatched_fraction_of_raw": round(results["unbatched"]["qps"] / raw_ips, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
