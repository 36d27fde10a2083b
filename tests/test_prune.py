"""Pruning old runs' resumable checkpoints: which go, which stay, and the CLI's listing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from reid_platform.training.prune import prune_runs, run_folders

from conftest import REPO


def make_run(root, name: str, age_days: float, size: int = 1000):
    checkpoint = root / name / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"x" * size)
    stamp = time.time() - age_days * 86400
    os.utime(checkpoint, (stamp, stamp))
    return checkpoint


def test_prune_keeps_the_newest_young_and_busy_runs(tmp_path):
    results = tmp_path / "ray_results"
    old = make_run(results, "old", 30, 3000)
    mid = make_run(results, "mid", 10, 2000)
    new = make_run(results, "new", 0, 1000)
    busy = make_run(results, "busy", 40)
    trial = make_run(tmp_path / "tune" / "sweep" / "train", "trial1", 20)
    (results / "no-checkpoint").mkdir()
    assert [r.path.name for r in run_folders(tmp_path)] == [
        "new", "mid", "trial1", "old", "busy"]

    listed = prune_runs(tmp_path, keep_last=1, older_than_days=15, busy={"busy"})
    assert [r.path.name for r in listed] == ["trial1", "old"]
    assert [r.size_bytes for r in listed] == [1000, 3000]
    assert old.exists() and trial.exists()  # listing deletes nothing

    prune_runs(tmp_path, keep_last=1, older_than_days=15, delete=True, busy={"busy"})
    assert not old.exists() and not trial.exists()
    assert new.exists() and mid.exists() and busy.exists()
    with pytest.raises(ValueError, match="keep_last=-1"):
        prune_runs(tmp_path, keep_last=-1)


def test_prune_cli_lists_then_deletes(tmp_path):
    make_run(tmp_path / "ray_results", "a", 5, 2**20)
    make_run(tmp_path / "ray_results", "b", 1)
    env = dict(os.environ, REID_PLATFORM_HOME=str(tmp_path))
    cmd = [sys.executable, "jobs/prune.py", "--keep-last", "1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "would delete      1.0 MiB" in out.stdout and "add --yes" in out.stdout
    out = subprocess.run(cmd + ["--yes"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 run(s), freed 1.0 MiB" in out.stdout
    assert not list((tmp_path / "ray_results" / "a").glob("checkpoint_*"))
    bad = subprocess.run(cmd[:2] + ["--keep-last", "-2"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--keep-last and --older-than must be >= 0" in bad.stderr
