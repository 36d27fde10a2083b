"""Disk upkeep of the workspace: delete the resumable checkpoints of old training runs.

A training run leaves its resumable checkpoint (weights + optimizer state, about 3x the
weights with Adam) under `<workspace>/ray_results/<run>/` and a slim copy of its final model
(and best model) in MLflow's artifacts. Once a run is finished and will not be resumed, its
Ray checkpoint is dead weight; `prune_runs` deletes those of all but the newest runs. The
MLflow copies are kept: `mlflow artifacts download` (or the run's page) gets a model back.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """One training run's Ray folder and what pruning would free."""

    path: Path
    modified: float  # newest modification time of its checkpoints (seconds since epoch)
    size_bytes: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_folders(workspace: Path) -> list[RunFolder]:
    """Training runs with checkpoints under `<workspace>/ray_results` (and the per-trial Train
    runs of sweeps under `<workspace>/tune/<sweep>/train`), newest first."""
    roots = [workspace / "ray_results", *sorted((workspace / "tune").glob("*/train"))]
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for run in root.iterdir():
            checkpoints = [c for c in run.glob("checkpoint_*") if c.is_dir()]
            if not checkpoints:
                continue
            modified = max(c.stat().st_mtime for c in checkpoints)
            found.append(RunFolder(run, modified, sum(_size(c) for c in checkpoints)))
    return sorted(found, key=lambda r: r.modified, reverse=True)


def prune_runs(workspace: Path, keep_last: int = 5, older_than_days: float = 0.0,
               delete: bool = False, busy: set[str] | frozenset[str] = frozenset()
               ) -> list[RunFolder]:
    """The run folders to prune (and, with `delete`, prune them): every run but the
    `keep_last` newest, and only those untouched for `older_than_days`; never a run named in
    `busy` (e.g. MLflow runs still RUNNING).

    Returns:
        the folders pruned (or that would be, without `delete`).
    """
    if keep_last < 0 or older_than_days < 0:
        raise ValueError(f"keep_last={keep_last} and older_than_days={older_than_days} must be "
                         ">= 0")
    cutoff = time.time() - older_than_days * 86400
    candidates = [
        run for run in run_folders(workspace)[keep_last:]
        if run.modified <= cutoff and run.path.name not in busy
    ]
    if delete:
        for run in candidates:
            for checkpoint in run.path.glob("checkpoint_*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
    return candidates
