"""Export a checkpoint's model to ONNX, check it against PyTorch, log it to the training run.

    python jobs/export.py --checkpoint CKPT                 # CKPT/model.onnx, fp32
    python jobs/export.py --checkpoint CKPT --fp16 --out /models/market   # model.fp16.onnx
    python jobs/export.py --checkpoint CKPT --parity-data /data/some/images
    python jobs/export.py --smoke-test                      # tiny model + synthetic data

The graph maps images (B, 3, H, W) float32, normalised as in evaluation, to L2-normalised
embeddings (B, D) float32; B is dynamic. Its metadata holds the preprocessing contract (input
size, mean/std, channel order), the embedding width and feature, and the checkpoint's config
digest. The parity check embeds the checkpoint's own query images (through the eval
transform) with PyTorch and with ONNX Runtime and fails above a max abs difference of 1e-4
(fp32) or 5e-3 (fp16); nothing is written then. The file and the numbers are logged to the
checkpoint's MLflow run when it records one. The last line printed is `onnx: <path>`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import _cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--checkpoint", help="checkpoint directory or model.pt")
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format")
    parser.add_argument(
        "--fp16", action="store_true",
        help="float16 weights and activations, float32 input and output (model.fp16.onnx)",
    )
    parser.add_argument("--out", help="output folder (default: beside the checkpoint)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--parity-images", type=int, default=64, metavar="N",
        help="query images of the checkpoint's dataset to check parity on (default 64)",
    )
    parser.add_argument(
        "--parity-data", metavar="PATH",
        help="check parity on these images instead (dataset root, CSV manifest or folder)",
    )
    parser.add_argument(
        "--atol", type=float, default=None,
        help="bound on the max abs embedding difference (default 1e-4; 5e-3 with --fp16)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument(
        "--smoke-test", action="store_true",
        help="tiny random-init model and synthetic data in a temporary folder",
    )
    _cli.add_verbose_arg(parser)
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.smoke_test:
        parser.error("the following arguments are required: --checkpoint")
    if args.parity_images < 1:
        parser.error(f"--parity-images must be >= 1, got {args.parity_images}")
    if args.atol is not None and not args.atol > 0:
        parser.error(f"--atol must be > 0, got {args.atol}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    _cli.configure_console(args.verbose)
    from reid_platform.retrieval.export import ExportError, export_onnx, log_export

    scratch = (tempfile.TemporaryDirectory(prefix="export-smoke-") if args.smoke_test
               else contextlib.nullcontext())
    with scratch as tmp:
        if args.smoke_test:
            args.checkpoint = str(_cli.smoke_checkpoint(Path(tmp))[0])
            args.parity_images = min(args.parity_images, 16)
        try:
            result = export_onnx(
                args.checkpoint, args.out, fp16=args.fp16, opset=args.opset,
                parity_images=args.parity_images, parity_data=args.parity_data,
                atol=args.atol,
            )
        except ExportError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        meta = result.metadata
        print(f"[export] {meta.arch} {meta.backbone} at {meta.input_height}x{meta.input_width} "
              f"-> {meta.embedding_dim}-d embeddings ({meta.feature}), epoch "
              f"{meta.checkpoint_epoch}, config {meta.config_digest}")
        print(f"[export] {meta.exporter} exporter, opset {meta.opset}, {meta.precision}, "
              f"{result.size_bytes / 2**20:.1f} MiB")
        print(f"[export] parity on {result.parity_source}: {result.parity.summary()}")
        if result.skipped:
            print(f"[export] warning: {len(result.skipped)} parity image(s) unreadable, skipped "
                  f"(e.g. {result.skipped[0]})")
        if args.no_mlflow:
            print("mlflow: not logged (--no-mlflow)")
        else:
            try:
                uri, run_id = log_export(result)
                print(f"mlflow: logged to run {run_id} ({uri})")
            except ExportError as err:
                print(f"mlflow: not logged: {err}")
        print(f"onnx: {result.path}")
        return str(result.path)


if __name__ == "__main__":
    _cli.run_main(main)
