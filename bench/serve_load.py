"""Serving throughput and latency of the retrieval service, against the raw model, in one run.

Starts a loopback-only local Ray (or joins $RAY_ADDRESS) and Serve on 127.0.0.1, builds a
random-weight model (`--backbone`) and a sharded Flat index of random unit vectors, then
drives the HTTP API with `--clients` concurrent clients in three modes: "batched" (the Embedder
batches up to `--max-batch-size`, each shard coalesces concurrent searches into one FAISS call),
"no_shard_coalescing" (the same, but every search hits FAISS alone: the service before search
batching) and "unbatched" (neither). Then, batched again, an open-loop load at half the batched
mode's QPS measures latency below saturation. In the same run, before Serve starts, the
baselines: the model's raw batched forward throughput (images/s, batches of
`--max-batch-size`, no HTTP, decode or search) with the Embedder's threads and with every core
(what a plain PyTorch script gets from the machine), and a single-image forward's latency.

With `--runtimes torch,onnx` (the default) the checkpoint is also exported to ONNX (parity
checked on the bench's images) and served with `runtime: onnx`: its batched mode and half
load are measured after the torch modes, against ONNX Runtime's own raw batched throughput
(Embedder threads and every core) and single-image latency, in the same run.

    python bench/serve_load.py                        # resnet50 at 256x128, 32 clients
    python bench/serve_load.py --endpoint embed       # embedding only, no index search
    python bench/serve_load.py --smoke-test           # tiny model, small load, seconds
    python bench/serve_load.py --runtimes torch       # PyTorch Embedder only

Prints one JSON line. Per mode ("batched", "no_shard_coalescing", "unbatched"):
  qps           successful requests/s over the measured requests
  p50_ms, p99_ms, mean_ms  request latency seen by the clients
  errors        non-200 answers (should be 0)
  mean_batch, largest_batch   Embedder batch sizes during the mode (from /v1/stats)
  mean_shard_batch  queries per FAISS search call on the shards during the mode
  hops_ms       mean ms per request of each step in the ingress (parse, decode, embed, search,
                merge, total) and "proxy_and_client" = client latency - ingress total
and half_load (qps asked and got, p50/p99 at half the batched QPS, p99 / single-image forward),
scene_boxes (batched app, one client: p50 latency of a scene image with `--boxes` boxes, every
box cropped and searched in one request, against one crop's request, and their ratio),
raw_model_ips (images/s of model.embed, Embedder threads), raw_model_ips_all_cores,
single_image_ms, and fractions: *_fraction_of_raw (qps / raw_model_ips) and
batched_fraction_of_machine (qps / raw_model_ips_all_cores).
"onnx" (with --runtimes onnx): batched, half_load, raw_model_ips, raw_model_ips_all_cores,
single_image_ms, the fractions, export_s and parity_max_abs_diff of the ONNX runtime; and
onnx_vs_torch_batched_qps.
The load generator runs in this process: on a small CPU machine it competes with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
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
    parser.add_argument("--boxes", type=int, default=8, help="boxes of the scene request")
    parser.add_argument(
        "--scene-requests", type=int, default=40, help="sequential scene and crop requests each"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--embedder-cpus",
        type=float,
        default=None,
        help="CPUs (and torch threads) of the Embedder; default: what the app's sizing gives "
        "(the cores less 0.1 per shard and 0.1 for the ingress)",
    )
    parser.add_argument(
        "--runtimes",
        default="torch,onnx",
        help="Embedder runtimes to measure, comma-separated: torch, onnx (default both)",
    )
    parser.add_argument("--smoke-test", action="store_true", help="tiny model and load")
    args = parser.parse_args()
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(args.runtimes) - {"torch", "onnx"})
    if unknown or "torch" not in args.runtimes:
        parser.error(f"--runtimes: torch and optionally onnx, got {args.runtimes}")
    if args.smoke_test:
        args.backbone, args.height, args.width = "test_resnet", 64, 32
        args.gallery_size, args.clients, args.requests, args.warmup = 500, 8, 48, 8
        args.scene_requests = 6
    if args.embedder_cpus is None:
        from serve_apps.retrieval import plan_cpus

        args.embedder_cpus = plan_cpus(args.shards, 1, 1, float(os.cpu_count() or 1))["embedder"]
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


def best_images_per_s(run, batch_size: int, sync=lambda: None) -> float:
    """`run()` embeds one batch of `batch_size`: best of 3 timed runs of >= 1 s (2 warm-up)."""
    for _ in range(2):
        run()
    best = 0.0
    for _ in range(3):
        sync()
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            run()
            done += batch_size
        sync()
        best = max(best, done / (time.perf_counter() - start))
    return best


def raw_images_per_s(model, args: argparse.Namespace, device: str) -> float:
    """model.embed on (max_batch_size, 3, H, W) batches: best of 3 timed runs of >= 1 s."""
    import torch

    model = model.to(device)
    batch = torch.randn(args.max_batch_size, 3, args.height, args.width, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.inference_mode():
        return best_images_per_s(lambda: model.embed(batch), len(batch), sync)


def onnx_baselines(path: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    """ONNX Runtime on the export: (images/s with the Embedder's threads, with every core,
    median ms of one image), timed like the PyTorch baselines."""
    from reid_platform.retrieval.export import OnnxEmbedder

    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.max_batch_size, 3, args.height, args.width), np.float32)
    ips = []
    for threads in (max(1, round(args.embedder_cpus)), os.cpu_count() or 1):
        session = OnnxEmbedder(path, num_threads=threads)
        ips.append(best_images_per_s(lambda s=session: s(batch), len(batch)))
    session = OnnxEmbedder(path, num_threads=max(1, round(args.embedder_cpus)))
    times = []
    for n in range(25):
        start = time.perf_counter()
        session(batch[:1])
        if n >= 5:
            times.append(time.perf_counter() - start)
    return ips[0], ips[1], 1000.0 * float(np.median(times))


def single_image_ms(model, args: argparse.Namespace, device: str) -> float:
    """Median ms of model.embed on one (1, 3, H, W) image."""
    import torch

    image = torch.randn(1, 3, args.height, args.width, device=device)
    times = []
    with torch.inference_mode():
        for n in range(25):
            start = time.perf_counter()
            model.embed(image)
            if device == "cuda":
                torch.cuda.synchronize()
            if n >= 5:
                times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


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


async def drive_rate(
    base_url: str, path: str, images: list[bytes], args: argparse.Namespace, rate: float
) -> tuple[list[float], int, float]:
    """Open loop: request n starts at n / rate s, whatever the earlier ones are doing."""
    latencies: list[float] = []
    errors = 0
    total = args.requests
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as client:

        async def one(n: int, start: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            data = {"k": str(args.k)} if args.endpoint == "search" else None
            t0 = time.perf_counter()
            response = await client.post(path, files={"image": images[n % len(images)]}, data=data)
            latencies.append(time.perf_counter() - t0)
            errors += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*[one(n, start) for n in range(total)])
        wall = time.perf_counter() - start
    return latencies, errors, wall


def scene_vs_crop(base_url: str, args: argparse.Namespace) -> dict:
    """p50 latency (one client, back to back) of a scene with `args.boxes` boxes of the model's
    input size against one crop of that size, alternating, on the running app."""
    from PIL import Image

    rng = np.random.default_rng(2)
    h, w = args.height, args.width
    columns = math.ceil(args.boxes / 2)
    scene = rng.integers(0, 256, (2 * h, columns * w, 3), dtype=np.uint8)
    boxes = [[(n % columns) * w, (n // columns) * h, w, h] for n in range(args.boxes)]

    def jpeg(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    scene_jpeg, crop_jpeg = jpeg(scene), jpeg(scene[:h, :w])
    latencies: dict[str, list[float]] = {"scene": [], "crop": []}
    errors = 0
    with httpx.Client(base_url=base_url, timeout=120.0) as client:
        for n in range(args.scene_requests + 2):  # the first of each is warm-up
            for kind in ("crop", "scene"):
                data = {"k": str(args.k)}
                if kind == "scene":
                    data["boxes"] = json.dumps(boxes)
                image = scene_jpeg if kind == "scene" else crop_jpeg
                start = time.perf_counter()
                response = client.post("/v1/search", files={"image": image}, data=data)
                if n >= 2:
                    latencies[kind].append(time.perf_counter() - start)
                ok = response.status_code == 200 and (
                    kind == "crop" or len(response.json()["queries"]) == args.boxes
                )
                errors += not ok
    crop, scene_ms = (float(np.median(latencies[k])) * 1000 for k in ("crop", "scene"))
    return {
        "boxes": args.boxes,
        "requests": args.scene_requests,
        "crop_p50_ms": round(crop, 2),
        "scene_p50_ms": round(scene_ms, 2),
        "scene_vs_crop": round(scene_ms / crop, 2),
        "errors": errors,
    }


def service_stats(client: httpx.Client) -> dict:
    """Embedder and shard batch counts and the ingress's hop totals (ms), cumulative."""
    stats = client.get("/v1/stats").json()
    seen = stats["batching"]["batch_sizes_seen"]
    shard: dict[int, int] = {}
    for per_shard in stats["batching"]["shard_search_batch_sizes"]:
        for size, n in per_shard.items():
            shard[int(size)] = shard.get(int(size), 0) + n
    hops = {h: v["mean_ms"] * v["count"] for h, v in stats["profile"].items()}
    counts = {h: v["count"] for h, v in stats["profile"].items()}
    return {
        "batches": {int(size): n for size, n in seen.items()},
        "shard": shard,
        "hops": hops,
        "counts": counts,
    }


def _mean_batch(before: dict[int, int], after: dict[int, int]) -> tuple[float, int]:
    diff = {s: after.get(s, 0) - before.get(s, 0) for s in after}
    calls = sum(diff.values())
    mean = sum(s * n for s, n in diff.items()) / max(calls, 1)
    return round(mean, 2), max((s for s, n in diff.items() if n), default=0)


def run_mode(
    base_url: str, images: list[bytes], args: argparse.Namespace, rate: float | None = None
) -> dict:
    path = f"/v1/{args.endpoint}"
    asyncio.run(drive(base_url, path, images, args, args.warmup))
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        before = service_stats(client)
        if rate is None:
            latencies, errors, wall = asyncio.run(
                drive(base_url, path, images, args, args.requests)
            )
        else:
            latencies, errors, wall = asyncio.run(drive_rate(base_url, path, images, args, rate))
        after = service_stats(client)
    ms = np.array(latencies) * 1000.0
    mean_batch, largest = _mean_batch(before["batches"], after["batches"])
    hops = {}
    for hop, total in after["hops"].items():
        n = after["counts"][hop] - before["counts"].get(hop, 0)
        if n:
            hops[hop] = round((total - before["hops"].get(hop, 0.0)) / n, 2)
    if "total" in hops:
        hops["proxy_and_client"] = round(float(ms.mean()) - hops["total"], 2)
    return {
        "qps": round((len(latencies) - errors) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "errors": errors,
        "mean_batch": mean_batch,
        "largest_batch": largest,
        "mean_shard_batch": _mean_batch(before["shard"], after["shard"])[0],
        "hops_ms": hops,
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
        torch.set_num_threads(os.cpu_count() or 1)  # a plain script using the whole machine
        raw_all = raw_images_per_s(model, args, device)
        torch.set_num_threads(max(1, round(args.embedder_cpus)))  # as the Embedder replica
        raw_ips = raw_images_per_s(model, args, device)
        single_ms = single_image_ms(model, args, device)
        dim = model.embedding_dim
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        index_dir = make_index(Path(tmp), checkpoint, dim, args)
        images = jpeg_images(args)
        onnx: dict = {}
        if "onnx" in args.runtimes:
            from reid_platform.retrieval.export import export_onnx

            parity = Path(tmp) / "parity-images"  # the random-weight checkpoint has no data
            parity.mkdir()
            for n, image in enumerate(images):
                (parity / f"{n:03d}.jpg").write_bytes(image)
            start = time.perf_counter()
            exported = export_onnx(checkpoint, parity_data=parity)  # beside the checkpoint
            onnx["export_s"] = round(time.perf_counter() - start, 1)
            onnx["parity_max_abs_diff"] = exported.parity.max_abs_diff
            ips, ips_all, one_ms = onnx_baselines(exported.path, args)
            onnx.update(raw_model_ips=round(ips, 2), raw_model_ips_all_cores=round(ips_all, 2),
                        single_image_ms=round(one_ms, 2))

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = f"http://127.0.0.1:{port}/{APP}"
        results = {}
        try:
            modes = [
                ("batched", args.max_batch_size, 64, "torch"),
                ("no_shard_coalescing", args.max_batch_size, 1, "torch"),
                ("unbatched", 1, 1, "torch"),
            ]
            if onnx:
                modes.append(("onnx_batched", args.max_batch_size, 64, "onnx"))
            for mode, batch, shard_batch, runtime in modes:
                app = build_app(
                    RetrievalArgs(
                        index_dir=str(index_dir),
                        runtime=runtime,
                        max_batch_size=batch,
                        batch_wait_timeout_s=args.batch_wait_ms / 1000.0 if batch > 1 else 0.0,
                        shard_max_batch_size=shard_batch,
                        shard_batch_wait_timeout_s=0.002 if shard_batch > 1 else 0.0,
                        embedder_num_cpus=args.embedder_cpus,
                        max_k=max(args.k, 10),
                        auth_token="",
                    )
                )
                serve.run(app, name=APP, route_prefix=f"/{APP}")
                measured = run_mode(base_url, images, args)
                if mode in ("batched", "onnx_batched"):  # half the saturating load, open loop
                    rate = measured["qps"] / 2
                    half = run_mode(base_url, images, args, rate=rate)
                    one_ms = single_ms if runtime == "torch" else onnx["single_image_ms"]
                    half_load = {
                        "qps_asked": round(rate, 2),
                        **{k: half[k] for k in ("qps", "p50_ms", "p99_ms", "errors")},
                        "p99_vs_single_image": round(half["p99_ms"] / one_ms, 2),
                    }
                if runtime == "onnx":
                    onnx.update(batched=measured, half_load=half_load)
                    continue
                results[mode] = measured
                if mode == "batched":
                    results["half_load"] = half_load
                    if args.endpoint == "search":
                        results["scene_boxes"] = scene_vs_crop(base_url, args)
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
                **results,
                "raw_model_ips": round(raw_ips, 2),
                "raw_model_ips_all_cores": round(raw_all, 2),
                "single_image_ms": round(single_ms, 2),
                "batched_fraction_of_raw": round(results["batched"]["qps"] / raw_ips, 3),
                "no_shard_coalescing_fraction_of_raw": round(
                    results["no_shard_coalescing"]["qps"] / raw_ips, 3
                ),
                "unbatched_fraction_of_raw": round(results["unbatched"]["qps"] / raw_ips, 3),
                "batched_fraction_of_machine": round(results["batched"]["qps"] / raw_all, 3),
                **onnx_summary(onnx, results),
            }
        )
    )


def onnx_summary(onnx: dict, results: dict) -> dict:
    """The "onnx" entry of the JSON line (empty without --runtimes onnx)."""
    if not onnx:
        return {}
    qps = onnx["batched"]["qps"]
    return {
        "onnx": {
            **onnx,
            "batched_fraction_of_raw": round(qps / onnx["raw_model_ips"], 3),
            "batched_fraction_of_machine": round(qps / onnx["raw_model_ips_all_cores"], 3),
        },
        "onnx_vs_torch_batched_qps": round(qps / results["batched"]["qps"], 3),
    }


if __name__ == "__main__":
    main()
