"""End to end: `jobs/train.py` with 2 DDP workers on Ray, MLflow metrics, checkpoints, resume,
the BoT config's smoke test, and real images (scikit-learn's digits) learning something."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from reid_platform.checkpoint import load_model, read_checkpoint
from reid_platform.config import Config, load_config
from reid_platform.data.root import load_config_dataset
from reid_platform.evaluation.embed import evaluate_model

from conftest import REPO, job_env, tiny_config_overrides

pytestmark = pytest.mark.slow


def run_job(args: list[str], env: dict[str, str], timeout: int = 600) -> str:
    """Run a job script; fail with its output if it fails; return stdout."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    # The console is ours: none of Ray Train's reports, MLflow's download bars or tracebacks.
    for noise in ("TrainingReport", "Downloading artifacts", "Traceback", "Checkpoint succ"):
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stdout[-3000:], proc.stderr)
    return proc.stdout


def overrides(**extra) -> list[str]:
    values = {**tiny_config_overrides(), **extra}
    return [f"{k}={v}" for k, v in values.items()]


def last_checkpoint(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("checkpoint: "), f"last line is {last!r}"
    return Path(last.removeprefix("checkpoint: "))


def mlflow_run(stdout: str, workspace: Path):
    line = next(x for x in stdout.splitlines() if x.startswith("mlflow run: "))
    run_id = line.split()[2]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    return client, client.get_run(run_id)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out.add(item.path)
        if item.is_dir:
            out |= artifact_paths(client, run_id, item.path)
    return out


def test_ddp_train_logs_metrics_and_resumes(tiny_market, ray_address, workspace, tmp_path):
    # A copy of the tiny tree with one truncated query JPEG: skipped and counted, no crash.
    data = tmp_path / "market"
    shutil.copytree(tiny_market, data)
    corrupt = sorted((data / "query").glob("*.jpg"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    env = job_env(ray_address, workspace)
    common = ["jobs/train.py", "--config", "configs/demo.yaml", "--set",
              f"data.root={data}", "data.format=market1501"]
    stdout = run_job(common + overrides(**{"train.epochs": 2, "train.swa_epochs": 0}), env)
    checkpoint = last_checkpoint(stdout)
    payload = read_checkpoint(checkpoint)
    assert payload["epoch"] == 2
    assert payload["num_classes"] == 12
    model, config = load_model(checkpoint)
    assert config.data.root == str(data) and config.model.backbone == "test_resnet"

    client, run = mlflow_run(stdout, workspace)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.margin"] == "0.3"
    assert run.data.tags["dataset"] == data.name
    assert len(run.data.tags["git_commit"]) == 40 and len(run.data.tags["code_digest"]) == 16
    assert run.data.metrics["eval_skipped_images"] == 1
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert all(0.0 <= m.value <= 1.0 for m in history), key
    score = client.get_metric_history(run.info.run_id, "score")[-1].value
    rank1 = client.get_metric_history(run.info.run_id, "rank1")[-1].value
    mAP = client.get_metric_history(run.info.run_id, "mAP")[-1].value
    assert score == pytest.approx(0.5 * rank1 + 0.5 * mAP)
    for key in ("loss", "loss_id", "loss_triplet", "lr", "images_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "plots/cmc.png", "checkpoints/final/model.pt",
            "checkpoints/best/model.pt"} <= artifacts
    saved = load_config(Path(stdout.split("config: ")[1].splitlines()[0]))
    assert saved.train.epochs == 2 and saved.data.root == str(data)

    # Resume: continues at epoch 3 with the optimizer state, then SWA over the last epoch.
    stdout = run_job(
        common + overrides(**{"train.epochs": 3, "train.swa_epochs": 1,
                              "train.resume_from": str(checkpoint)}),
        env,
    )
    resumed = last_checkpoint(stdout)
    assert read_checkpoint(resumed)["epoch"] == 3
    client, run = mlflow_run(stdout, workspace)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3]
    assert run.data.metrics["epoch"] == 3
    for key in ("pre_swa_rank1", "pre_swa_mAP", "pre_swa_mINP"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    # The headline metrics are those of the saved (SWA) checkpoint: re-evaluate it here.
    model, config = load_model(resumed)
    dataset = load_config_dataset(config)
    result, _ = evaluate_model(model, dataset.query, dataset.gallery, config.data.height,
                               config.data.width, batch_size=config.data.eval_batch_size)
    assert result.mAP == pytest.approx(run.data.metrics["mAP"], abs=1e-4)
    assert result.rank(1) == pytest.approx(run.data.metrics["rank1"], abs=1e-4)
    assert "SWA model (the checkpoint) metrics: rank1" in stdout
    # MLflow keeps the model without its optimizer state; the resumable one keeps it.
    final = client.download_artifacts(run.info.run_id, "checkpoints/final", str(tmp_path))
    assert read_checkpoint(final)["training_state"] == {}
    assert "optimizer" in read_checkpoint(resumed)["training_state"]


def test_bot_config_smoke_test_on_market_tree(tiny_market, ray_address, workspace):
    stdout = run_job(
        ["jobs/train.py", "--config", "configs/market1501_bot.yaml", "--smoke-test",
         "--set", f"data.root={tiny_market}"],
        job_env(ray_address, workspace),
    )
    payload = read_checkpoint(last_checkpoint(stdout))
    config = Config.from_dict(payload["config"])
    assert config.model.backbone == "resnet50" and config.loss.center_weight > 0
    assert payload["epoch"] == 1
    assert "rank1" in payload["metrics"]


def test_bad_input_is_a_clear_error(tmp_path, workspace):
    env = job_env("", workspace)
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--set", "train.epoch=3"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.epoch'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--set", "data.format=market1501",
         f"data.root={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "bounding_box_train: missing" in proc.stderr

    # With the (default) synthetic format, a data.root holding other data is never replaced.
    keep = tmp_path / "mine" / "precious.txt"
    keep.parent.mkdir()
    keep.write_text("do not delete")
    for args, message in [
        ([f"data.root={keep.parent}"], "refusing to overwrite it"),
        (["model.backbone=resnet_50"], "is not a timm model; similar names"),
        ([f"train.resume_from={tmp_path / 'nope'}"], "train.resume_from="),
        (["train.num_workers=-1"], "train.num_workers=-1 must be >= 1 (Ray Train DDP workers)"),
    ]:
        proc = subprocess.run(
            [sys.executable, "jobs/train.py", "--set", *args], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert keep.read_text() == "do not delete"


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory) -> Path:
    """scikit-learn's bundled digits as folder-per-identity, all ten digits in every split."""
    from reid_platform.data.digits import write_digits_tree

    return write_digits_tree(tmp_path_factory.mktemp("digits"), size=32, seed=0)


def test_digits_training_beats_untrained(digits_tree, ray_session, workspace):
    from reid_platform.training.trainer import run_training

    base = Config().replace(**{
        **tiny_config_overrides(),
        "name": "digits",
        "data.root": str(digits_tree),
        "data.format": "folder",
        "data.height": 32,
        "data.width": 32,
        "data.num_ids_per_batch": 5,
        "data.num_instances": 8,
        "data.augment.flip_p": 0.0,  # a mirrored digit is another shape
        "data.augment.erasing_p": 0.0,
        "data.augment.pad": 2,
        "train.num_workers": 1,
        "train.lr": 0.001,
        "train.eval_every": 100,
    })
    untrained = run_training(base.replace(**{"train.epochs": 0}), progress=False)
    trained = run_training(base.replace(**{"train.epochs": 4}), progress=False)
    print(f"digits untrained mAP {untrained.metrics['mAP']:.4f} rank1 "
          f"{untrained.metrics['rank1']:.4f}; trained mAP {trained.metrics['mAP']:.4f} "
          f"rank1 {trained.metrics['rank1']:.4f}")
    assert untrained.metrics["mAP"] < 0.5
    assert trained.metrics["mAP"] > untrained.metrics["mAP"] + 0.15, (
        untrained.metrics, trained.metrics)
