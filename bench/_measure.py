"""Shared by the evaluation benchmarks: synthetic re-ID features, peak memory, fresh processes.

Each measurement runs in its own process (`run_worker`) so that one method's memory never
counts against another's; inside it, `PeakRss` samples the resident set size (which, unlike
tracemalloc, also sees BLAS and FAISS buffers) while the method runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np


def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def available_mb() -> float:
    """MemAvailable of the machine, MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PeakRss:
    """Largest resident set size seen while the `with` block runs (sampled every few ms).

    Attributes (after the block): before_mb, peak_mb, increment_mb = peak_mb - before_mb.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.before_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.before_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def increment_mb(self) -> float:
        return self.peak_mb - self.before_mb


@dataclass(frozen=True)
class ReidProblem:
    """Query and gallery features with Market-1501-style labels."""

    query: np.ndarray  # (N, D) float32, L2-normalised
    gallery: np.ndarray  # (M, D) float32, L2-normalised
    q_pids: np.ndarray  # (N,)
    g_pids: np.ndarray  # (M,) with 0 = distractor, -1 = junk
    q_camids: np.ndarray
    g_camids: np.ndarray

    @property
    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q_pids, g_pids, q_camids, g_camids), the argument order of the metrics."""
        return self.q_pids, self.g_pids, self.q_camids, self.g_camids


def reid_problem(
    num_query: int,
    num_gallery: int,
    dim: int,
    num_ids: int,
    num_cameras: int,
    noise: float,
    distractor_share: float = 0.0,
    junk_share: float = 0.0,
    seed: int = 0,
) -> ReidProblem:
    """Unit vectors around one centre per identity (pids 1..num_ids), in chunks of 100k rows.

    Args:
        noise: standard deviation of the per-image noise around the unit-variance centres;
            larger is harder (at dim 512, ~2 gives mAP around 0.8).
        distractor_share, junk_share: fractions of the gallery with pid 0 (distractors, own
            random centres) and pid -1 (junk).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim), dtype=np.float32)  # row 0: unused
    q_pids = rng.integers(1, num_ids + 1, num_query)
    g_pids = rng.integers(1, num_ids + 1, num_gallery)
    special = rng.random(num_gallery)
    g_pids[special < distractor_share + junk_share] = 0
    g_pids[special < junk_share] = -1

    def embed(pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), dim), dtype=np.float32)
        for start in range(0, len(pids), 100_000):
            chunk_pids = pids[start : start + 100_000]
            chunk = np.where(
                (chunk_pids > 0)[:, None],
                centres[np.maximum(chunk_pids, 0)],
                rng.standard_normal((len(chunk_pids), dim), dtype=np.float32),
            )
            chunk += noise * rng.standard_normal(chunk.shape, dtype=np.float32)
            out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        return out

    return ReidProblem(
        query=embed(q_pids),
        gallery=embed(g_pids),
        q_pids=q_pids,
        g_pids=g_pids,
        q_camids=rng.integers(0, num_cameras, num_query),
        g_camids=rng.integers(0, num_cameras, num_gallery),
    )


def run_worker(script: str, args: list[str]) -> dict:
    """Run `python script --worker ... args` in a fresh process; returns its last JSON line.

    Raises:
        RuntimeError: the worker failed (its stderr is in the message).
    """
    command = [sys.executable, os.path.abspath(script), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
