"""Shared fixtures: one workspace and one local Ray instance (loopback only) per session."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Before anything imports ray or albumentations.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback, also for subprocesses
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402

import reid_platform  # noqa: E402, F401  (sets the loopback switch for Ray)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

# Ray workers run beside the test process on a small machine: one thread each avoids
# oversubscription (a tiny forward/backward went from 1.6 s to 0.06 s under load).
import torch  # noqa: E402

torch.set_num_threads(1)

# albumentations 2.0 silently ignores renamed arguments with only a warning: make it fatal.
warnings.filterwarnings("error", category=UserWarning, module="albumentations")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """The session's REID_PLATFORM_HOME (data, checkpoints, Ray results, MLflow)."""
    path = tmp_path_factory.mktemp("workspace")
    os.environ["REID_PLATFORM_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(workspace):
    """One local Ray for the whole session (start-up is ~10 s and ~650 MB)."""
    import ray

    from reid_platform.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """GCS address of the session's Ray, for job subprocesses (`RAY_ADDRESS=...`)."""
    return ray_session.get_runtime_context().gcs_address


def job_env(ray_address: str, workspace: Path) -> dict[str, str]:
    """Environment for running a `jobs/*.py` subprocess against the session's Ray."""
    return dict(os.environ, RAY_ADDRESS=ray_address, REID_PLATFORM_HOME=str(workspace))


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> Path:
    """A small synthetic Market-1501 tree (64x32 images), generated once per session."""
    from reid_platform.data.synthetic import generate_market_tree

    root = tmp_path_factory.mktemp("data") / "tiny_market"
    return generate_market_tree(
        root, num_train_ids=12, num_test_ids=8, num_cameras=3, num_distractors=4, num_junk=2,
        height=64, width=32, seed=1, progress=False,
    )


def tiny_config_overrides() -> dict:
    """Overrides that make any config a seconds-long CPU run (tiny model, 64x32 images)."""
    return {
        "model.backbone": "test_resnet",
        "data.height": 64,
        "data.width": 32,
        "data.num_ids_per_batch": 4,
        "data.num_instances": 2,
        "data.loader_workers": 0,
        "data.eval_batch_size": 64,
        "train.warmup_epochs": 0,
        "train.eval_every": 1,
        "train.num_workers": 2,
    }


def run_job(monkeypatch, capsys, script: str, args: list[str]) -> tuple[int, str, str]:
    """`jobs/<script>` run in this process through `_cli.run_main`, as its command line would.

    Returns:
        (exit code, stdout, stderr).
    """
    import importlib.util

    import _cli

    # Loaded by path: `evaluate`, `export`, ... are also names of installable packages.
    name = Path(script).stem
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        _cli.run_main(job.main)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
