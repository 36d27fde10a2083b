"""mAP change of flip test-time augmentation and of flip gallery augmentation, in one run.

    python bench/flip_map.py --checkpoint CKPT       # the checkpoint's own dataset (config)
    python bench/flip_map.py --smoke-test            # random-init tiny model, tiny data

Embeds the evaluation split of the checkpoint's dataset once per view (each image and its
mirror, `retrieval.embedders.embed_views` through `extract_features`) and scores, under the
Market-1501 protocol (cosine distance):
  raw            plain queries, plain gallery
  tta_flip       queries and gallery flip-averaged (`jobs/evaluate.py --tta flip`, and the
                 service with `tta: flip` over an index built with `--tta flip`)
  query_tta_only flip-averaged queries against a plain gallery
  augment_flip   plain queries, gallery of both views, each item scored by its best view
                 (`jobs/build_index.py --augment flip`, one hit per item)
Prints one JSON line per variant: rank1, mAP, mINP and d_mAP / d_rank1 against raw.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def views_of(model, samples, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every sample and of its mirror image, (2, N, D): one `embed_views` pass
    per batch of 64, as the gallery build and the service compute them."""
    from reid_platform.data.dataset import read_image
    from reid_platform.data.transforms import build_eval_transform
    from reid_platform.retrieval.embedders import embed_views

    transform = build_eval_transform(*size)
    out = []
    for start in range(0, len(samples), 64):
        images = [read_image(s.path, s.box) for s in samples[start : start + 64]]
        batch = torch.stack([transform(image=image)["image"] for image in images])
        out.append(embed_views(model, batch))
    return torch.cat(out, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory or model.pt")
    parser.add_argument("--smoke-test", action="store_true", help="tiny random model and data")
    args = parser.parse_args()
    if not args.checkpoint and not args.smoke_test:
        parser.error("give --checkpoint (or --smoke-test)")

    from reid_platform.checkpoint import load_model
    from reid_platform.data.root import load_config_dataset
    from reid_platform.evaluation.metrics import evaluate_rank
    from reid_platform.retrieval.embedders import flip_mean

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="flip-map-") as tmp:
        checkpoint = args.checkpoint
        if args.smoke_test:
            sys.path.insert(0, str(REPO / "jobs"))
            import _cli

            checkpoint = str(_cli.smoke_checkpoint(Path(tmp))[0])
        model, config = load_model(checkpoint, "cpu")
        model.eval()
        dataset = load_config_dataset(config)
        size = (config.data.height, config.data.width)
        q_views = views_of(model, dataset.query, size)  # (2, Q, D)
        g_views = views_of(model, dataset.gallery, size)  # (2, G, D)
    q, g = q_views[0].numpy(), g_views[0].numpy()
    q_flip, g_flip = flip_mean(q_views).numpy(), flip_mean(g_views).numpy()
    g_mirror = g_views[1].numpy()
    labels = [np.array([getattr(s, f) for s in split]) for f, split in (
        ("pid", dataset.query), ("pid", dataset.gallery), ("camid", dataset.query),
        ("camid", dataset.gallery))]
    variants = {
        "raw": 1 - q @ g.T,
        "tta_flip": 1 - q_flip @ g_flip.T,
        "query_tta_only": 1 - q_flip @ g.T,
        "augment_flip": 1 - np.maximum(q @ g.T, q @ g_mirror.T),  # an item = its best view
    }
    results = {name: evaluate_rank(d, *labels) for name, d in variants.items()}
    raw = results["raw"]
    for name, r in results.items():
        line = {
            "bench": "flip_map",
            "variant": name,
            "checkpoint": "smoke" if args.smoke_test else str(checkpoint),
            "dataset": dataset.name,
            "num_query": len(dataset.query),
            "num_gallery": len(dataset.gallery),
            "rank1": round(float(r.cmc[0]), 4),
            "mAP": round(float(r.mAP), 4),
            "mINP": round(float(r.mINP), 4),
            "d_mAP": round(float(r.mAP - raw.mAP), 4),
            "d_rank1": round(float(r.cmc[0] - raw.cmc[0]), 4),
        }
        print(json.dumps(line))


if __name__ == "__main__":
    main()
