"""Raw embedding throughput on this CPU: the PyTorch model vs its ONNX export under ONNX Runtime.

Same checkpoint (or a random-init `--backbone`), same input batch, same thread count, measured
in one run and interleaved (torch, onnx, torch, onnx, ...: the best of `--rounds` timed runs of
`--seconds` each per side), so a noisy shared machine slows both alike. No decode, no HTTP.

    python bench/onnx_runtime.py                       # resnet18 at 128x64, batches 1/8/32
    python bench/onnx_runtime.py --checkpoint CKPT --fp16
    python bench/onnx_runtime.py --smoke-test          # tiny model, seconds

Prints one JSON line per batch size:
  torch_images_per_s   model.embed under torch.inference_mode, torch.set_num_threads(threads)
  onnx_images_per_s    OnnxEmbedder (CPU provider, intra-op threads, no spinning: the service's
                       settings)
  onnx_vs_torch        onnx_images_per_s / torch_images_per_s (the ratio to compare)
  onnx_fp16_images_per_s, fp16_vs_torch   with --fp16
  max_abs_diff         ONNX vs PyTorch embeddings of the measured batch
  load_average         the machine's 1-minute load when the line was measured (a shared
                       machine: above its core count, absolute numbers mean little)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

import reid_platform  # noqa: E402, F401  (loopback switch before ray is imported)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to measure (default: random weights)")
    parser.add_argument("--backbone", default="resnet18", help="timm model without --checkpoint")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--seconds", type=float, default=2.0, help="per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per side (best kept)")
    parser.add_argument("--fp16", action="store_true", help="also the fp16 export")
    parser.add_argument("--smoke-test", action="store_true", help="tiny model, short runs")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width = "test_resnet", 64, 32
        args.seconds, args.rounds, args.fp16 = 0.2, 1, True
    return args


def load(args: argparse.Namespace):
    """(model in eval mode, input height, width, description)."""
    from reid_platform.checkpoint import load_model
    from reid_platform.config import Config
    from reid_platform.models import build_model

    if args.checkpoint:
        model, config = load_model(args.checkpoint)
        return model, config.data.height, config.data.width, str(args.checkpoint)
    config = Config().replace(**{"model.backbone": args.backbone})
    model = build_model(config.model, num_classes=751).eval()
    return model, args.height, args.width, f"{args.backbone} (random weights)"


def exported(model, height: int, width: int, fp16: bool, threads: int):
    """An OnnxEmbedder of `model` (exported in memory) and the export time in seconds."""
    import torch

    from reid_platform.retrieval import export as ex

    start = time.perf_counter()
    proto, exporter = ex.model_to_onnx(model, height, width)
    if fp16:
        proto = ex.to_fp16(proto)
    meta = ex.OnnxMetadata(height, width, model.embedding_dim, model.config.arch,
                           model.config.backbone, "", "", 0, "fp16" if fp16 else "fp32",
                           exporter, ex.DEFAULT_OPSET, torch.__version__)
    ex.set_metadata(proto, meta)
    embedder = ex.OnnxEmbedder(proto.SerializeToString(), num_threads=threads,
                               providers=["CPUExecutionProvider"])
    return embedder, time.perf_counter() - start


def images_per_s(run, batch_size: int, seconds: float) -> float:
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run()
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    model, height, width, what = load(args)
    onnx32, export_s = exported(model, height, width, False, args.threads)
    onnx16 = exported(model, height, width, True, args.threads)[0] if args.fp16 else None
    rng = np.random.default_rng(0)
    for batch_size in args.batch_sizes:
        batch = rng.standard_normal((batch_size, 3, height, width), dtype=np.float32)
        tensor = torch.from_numpy(batch)

        def run_torch(tensor=tensor):
            with torch.inference_mode():
                return model.embed(tensor).numpy()

        runners = {"torch": run_torch, "onnx": lambda batch=batch: onnx32(batch)}
        if onnx16 is not None:
            runners["onnx_fp16"] = lambda batch=batch: onnx16(batch)
        for run in runners.values():  # warm-up: allocator, ORT's first-run planning
            run()
            run()
        best = dict.fromkeys(runners, 0.0)
        for _ in range(args.rounds):
            for name, run in runners.items():
                best[name] = max(best[name], images_per_s(run, batch_size, args.seconds))
        line = {
            "bench": "onnx_runtime",
            "model": what,
            "input": [height, width],
            "batch_size": batch_size,
            "threads": args.threads,
            "torch_images_per_s": round(best["torch"], 1),
            "onnx_images_per_s": round(best["onnx"], 1),
            "onnx_vs_torch": round(best["onnx"] / best["torch"], 3),
            "max_abs_diff": float(np.abs(onnx32(batch) - run_torch()).max()),
            "export_s": round(export_s, 1),
            "load_average": round(os.getloadavg()[0], 1),
        }
        if onnx16 is not None:
            line["onnx_fp16_images_per_s"] = round(best["onnx_fp16"], 1)
            line["fp16_vs_torch"] = round(best["onnx_fp16"] / best["torch"], 3)
            line["fp16_max_abs_diff"] = float(np.abs(onnx16(batch) - run_torch()).max())
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
