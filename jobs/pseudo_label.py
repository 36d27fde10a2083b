"""Pseudo-label unlabelled images: embed them with a model, cluster, write a training manifest.

    python jobs/pseudo_label.py --checkpoint CKPT --images PATH [--method dbscan|kmeans|link]
        [--distance jaccard|cosine] [--out DIR]
    python jobs/pseudo_label.py ... --method dbscan --eps 0.6 --min-samples 4
    python jobs/pseudo_label.py ... --method kmeans --clusters 1000
    python jobs/pseudo_label.py ... --method link --threshold 0.5
    python jobs/pseudo_label.py --smoke-test                  # tiny model + synthetic images

PATH is a folder of images (any depth), a CSV manifest (`path` column; `pid`, if present, only
scores the clustering) or a Market-1501 tree (its training images). The images are embedded with
Ray Data (the gallery build's actor pool, GPUs when present). DIR (default
`<workspace>/pseudo_labels/<time>`) gets `pseudo_labels.csv` (a manifest for
`data.extra_train`), `report.json` and pictures; nothing already there is overwritten. The last
line printed is `pseudo labels: <csv>`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import _cli


def add_clustering_args(parser: argparse.ArgumentParser) -> None:
    """The clustering flags (also `self_train.*` keys of the same names)."""
    from reid_platform.pseudo.clustering import DISTANCES, METHODS
    from reid_platform.pseudo.distances import INDEXES

    group = parser.add_argument_group("clustering")
    group.add_argument("--method", choices=METHODS, default="dbscan",
                       help="dbscan (default), kmeans (--clusters) or link (--threshold)")
    group.add_argument("--distance", choices=DISTANCES, default=None,
                       help="k-reciprocal jaccard (default) or cosine; dbscan and link only")
    group.add_argument("--eps", type=float, default=0.0,
                       help="DBSCAN radius (default: from the data, see --eps-pairs)")
    group.add_argument("--eps-pairs", type=float, default=6.0,
                       help="auto eps: mean of the N x this smallest pair distances (about 3/4 "
                            "of the images per identity; default 6)")
    group.add_argument("--min-samples", type=int, default=4,
                       help="DBSCAN: images within eps (itself included) of a core image")
    group.add_argument("--clusters", type=int, default=0, help="k-means: pseudo identities")
    group.add_argument("--threshold", type=float, default=0.5,
                       help="link: largest distance to the nearest neighbour (default 0.5)")
    group.add_argument("--k1", type=int, default=20, help="jaccard: k-reciprocal neighbours")
    group.add_argument("--k2", type=int, default=6, help="jaccard: local query expansion")
    group.add_argument("--knn", type=int, default=0,
                       help="neighbours per image kept as candidate pairs (default k1)")
    group.add_argument("--min-cluster-size", type=int, default=2,
                       help="smaller clusters are outliers (default 2)")
    group.add_argument("--index", choices=INDEXES, default="auto",
                       help="neighbour search: flat (exact), ivf, or auto (ivf above 50k images)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--checkpoint", help="checkpoint directory or model.pt")
    parser.add_argument("--images", help="folder of images, CSV manifest or Market-1501 tree")
    parser.add_argument("--out", help="output folder (default <workspace>/pseudo_labels/<time>)")
    add_clustering_args(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help="embedding actors (default: one per GPU, else CPUs/2, 1..4)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny model and synthetic images in a temporary folder")
    args = parser.parse_args(argv)
    if not args.smoke_test:
        missing = [f"--{n}" for n in ("checkpoint", "images") if not getattr(args, n)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.method == "kmeans":
        if args.distance is not None:
            parser.error("--distance does not apply to --method kmeans (it clusters the "
                         "L2-normalised embeddings themselves)")
        if args.clusters < 2 and not args.smoke_test:
            parser.error("--method kmeans needs --clusters N (N >= 2 pseudo identities)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def clustering_options(args: argparse.Namespace) -> dict:
    """The `cluster_features` keyword arguments of the parsed flags."""
    return {
        "method": args.method,
        "distance": args.distance or "jaccard",
        "eps": args.eps,
        "eps_pairs": args.eps_pairs,
        "min_samples": args.min_samples,
        "clusters": args.clusters,
        "threshold": args.threshold,
        "k1": args.k1,
        "k2": args.k2,
        "knn": args.knn,
        "min_cluster_size": args.min_cluster_size,
        "index": args.index,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from reid_platform.config import resolve_workspace
    from reid_platform.pseudo.labels import pseudo_label

    scratch = (tempfile.TemporaryDirectory(prefix="pseudo-label-smoke-") if args.smoke_test
               else contextlib.nullcontext())
    with scratch as tmp:
        if args.smoke_test:
            args.checkpoint, args.images = _cli.smoke_checkpoint(Path(tmp))
            args.out = args.out or str(Path(tmp) / "pseudo")
            if args.method == "kmeans" and args.clusters < 2:
                args.clusters = 12
        out = args.out or str(
            resolve_workspace() / "pseudo_labels" / time.strftime("%Y%m%d-%H%M%S")
        )
        result = pseudo_label(
            args.checkpoint, args.images, out, batch_size=args.batch_size,
            concurrency=args.workers, num_gpus=args.num_gpus, progress=not args.no_progress,
            **clustering_options(args),
        )
        report = result.report
        print(_summary(report))
        for line in report["skipped"]:
            print(f"skipped {line}")
        for name, path in report["pictures"].items():
            print(f"picture {name}: {path}")
        print(f"report: {Path(report['csv']).parent / 'report.json'}")
        print(f"pseudo labels: {result.csv}")
    return report


def _summary(report: dict) -> str:
    setting = (f"eps {report['eps']:.4f}{' (auto)' if report.get('eps_auto') else ''}"
               if "eps" in report else
               f"threshold {report['threshold']}" if "threshold" in report else
               f"clusters asked {report.get('clusters')}")
    line = (f"{report['method']} on {report.get('distance', 'cosine')} ({setting}): "
            f"{report['num_images']} images -> {report['num_clusters']} pseudo identities, "
            f"{report['num_outliers']} outliers dropped, {report['num_skipped']} unreadable "
            f"skipped; largest cluster {report['largest_cluster']} images")
    if "ari" in report:
        line += (f"\nvs true ids ({report['num_true_ids']}): ARI {report['ari']:.4f} NMI "
                 f"{report['nmi']:.4f} purity {report['purity']:.4f} (outliers as singletons: "
                 f"ARI {report['ari_all']:.4f} NMI {report['nmi_all']:.4f})")
    return line


if __name__ == "__main__":
    _cli.run_main(main)
