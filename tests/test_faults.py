"""Faults, proven end to end: a Train worker SIGKILLed mid-epoch, batches whose images are all
corrupt on one DDP rank, a job stopped by SIGTERM, and booby-trapped checkpoints."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from reid_platform.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from reid_platform.config import Config
from reid_platform.models import build_model

from conftest import REPO, job_env, tiny_config_overrides


def overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**tiny_config_overrides(), **extra}.items()]


class Job:
    """A `jobs/*.py` subprocess whose output lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                match = re.search(pattern, line)
                if match:
                    return match
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-60:]))

    def finish(self, timeout: float = 600) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return "\n".join(self.lines)


def train_workers(ray_session) -> list[psutil.Process]:
    """The Ray Train worker processes of this test session's Ray (children of its raylet),
    never another Ray's on the same machine."""
    node = ray_session._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [p for p in raylet.children() if p.name().startswith("ray::RayTrainWorker")]


def mlflow_run(output: str, workspace: Path):
    run_id = re.search(r"^mlflow run: (\w+)", output, re.M).group(1)
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    return client, client.get_run(run_id)


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_with_one_metric_value_per_epoch(
    tiny_market, ray_session, ray_address, workspace
):
    epochs, iters = 4, 40
    job = Job(["jobs/train.py", "--set", f"data.root={tiny_market}", "data.format=market1501",
               *overrides(**{"train.epochs": epochs, "train.batches_per_epoch": iters,
                             "train.max_failures": 1, "train.log_every": 5,
                             "train.swa_epochs": 0, "name": "fault-kill"})],
              job_env(ray_address, workspace))
    job.wait_for(r"\[train\] epoch 2/4 ")  # epoch 2 finished and checkpointed
    done = int(job.wait_for(r"\[train\] epoch 3 iter (\d+)/").group(1))  # mid-epoch 3
    victims = train_workers(ray_session)
    assert len(victims) == 2, victims
    victims[-1].send_signal(signal.SIGKILL)
    job.wait_for(r"\[train\] restarted after epoch (\d+)")
    output = job.finish()
    assert job.proc.returncode == 0, output[-4000:]
    restarted = int(re.search(r"restarted after epoch (\d+)", output).group(1))
    # At most the epoch in progress is lost: it restarts from the last finished epoch.
    assert restarted == 2, output[-3000:]
    print(f"killed a worker at epoch 3 iteration >= {done}/{iters}; restarted after epoch "
          f"{restarted}: lost at most {iters} iterations")

    client, run = mlflow_run(output, workspace)
    assert run.info.status == "FINISHED"
    for key in ("loss", "loss_id", "loss_triplet", "lr", "epoch", "rank1", "mAP", "score"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    final = Path(output.strip().splitlines()[-1].removeprefix("checkpoint: "))
    assert read_checkpoint(final)["epoch"] == epochs
    scores = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "score")}
    best_epoch = max(scores, key=lambda s: (scores[s], -s))
    # The best survives the restart: chosen over all epochs, not only those after it.
    assert run.data.tags["best_epoch"] == str(best_epoch), (scores, run.data.tags)
    assert float(run.data.tags["best_score"]) == pytest.approx(scores[best_epoch], abs=1e-6)


@pytest.mark.slow
def test_batches_all_corrupt_on_one_rank_do_not_hang_ddp(tiny_market, ray_address, workspace,
                                                          tmp_path):
    data = tmp_path / "market"
    shutil.copytree(tiny_market, data)
    train = sorted((data / "bounding_box_train").glob("*.jpg"))
    pids = sorted({p.name.split("_")[0] for p in train})
    broken = pids[:3]  # every image of three identities is truncated
    for path in train:
        if path.name.split("_")[0] in broken:
            path.write_bytes(path.read_bytes()[:100])
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--set", f"data.root={data}", "data.format=market1501",
         *overrides(**{"train.epochs": 2, "train.swa_epochs": 0, "data.num_ids_per_batch": 1,
                       "data.num_instances": 4, "name": "fault-corrupt"})],
        cwd=REPO, env=job_env(ray_address, workspace), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, run = mlflow_run(proc.stdout, workspace)
    skipped = client.get_metric_history(run.info.run_id, "skipped_images")
    assert sum(m.value for m in skipped) > 0
    assert "corrupt image(s)" in proc.stdout


@pytest.mark.slow
def test_sigterm_ends_the_mlflow_run_killed(tiny_market, ray_address, workspace):
    job = Job(["jobs/train.py", "--set", f"data.root={tiny_market}", "data.format=market1501",
               *overrides(**{"train.epochs": 50, "train.swa_epochs": 0, "name": "fault-term"})],
              job_env(ray_address, workspace))
    job.wait_for(r"\[train\] epoch 1/50 ")
    job.proc.send_signal(signal.SIGTERM)
    output = job.finish(timeout=120)
    assert job.proc.returncode == 130, output[-3000:]
    assert "interrupted" in output
    assert "Traceback" not in output, output[max(output.find("Traceback") - 300, 0):][:4000]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fault-term")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"


# ---- checkpoints that would run code -----------------------------------------------------


class Payload:
    """Pickles into a call of os.system: what a crafted model.pt does on unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def booby_trap(directory: Path, config: Config, protocol: int) -> Path:
    """Turn a real checkpoint into one that runs a command on unpickling; returns the marker
    file the command would create."""
    save_checkpoint(directory, build_model(config.model, 12), config, 1)
    payload = torch.load(directory / "model.pt", weights_only=True)
    marker = directory / "payload-ran"
    payload["metrics"] = {"rank1": Payload(marker)}
    with open(directory / "model.pt", "wb") as f:
        torch.save(payload, f, pickle_protocol=protocol)
    return marker


def tiny_config(tiny_market: Path) -> Config:
    return Config().replace(**{**tiny_config_overrides(), "data.root": str(tiny_market),
                               "data.format": "market1501"})


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_booby_trapped_checkpoint_is_refused_and_never_runs(protocol, tmp_path, tiny_market):
    marker = booby_trap(tmp_path / "trap", tiny_config(tiny_market), protocol)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        read_checkpoint(tmp_path / "trap")
    assert not marker.exists()


@pytest.mark.slow
def test_every_entry_point_refuses_a_booby_trapped_checkpoint(tmp_path, tiny_market, workspace,
                                                              ray_address):
    """`--checkpoint` of evaluate and build_index, and `train.resume_from` (Ray Train's restart,
    the index manifest's checkpoint and the service's Embedder read through the same
    `read_checkpoint`)."""
    directory = tmp_path / "trap"
    marker = booby_trap(directory, tiny_config(tiny_market), 2)
    env = job_env(ray_address, workspace)
    for args in (
        ["jobs/evaluate.py", "--checkpoint", str(directory), "--no-mlflow"],
        ["jobs/build_index.py", "--checkpoint", str(directory), "--gallery", str(tmp_path),
         "--out", str(tmp_path / "index")],
        ["jobs/train.py", "--set", *overrides(**{"train.resume_from": str(directory)})],
    ):
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "refused by the safe loader" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not marker.exists()
