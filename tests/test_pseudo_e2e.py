"""End to end: jobs/pseudo_label.py on a tiny Market tree (Ray Data embedding), its bad-input
errors, and a 2-round jobs/self_train.py run with its MLflow parent and child runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from reid_platform.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from reid_platform.config import Config, load_config
from reid_platform.data.formats import DatasetError, load_csv, load_market1501
from reid_platform.models import build_model
from reid_platform.pseudo.experiment import split_labelled
from reid_platform.pseudo.rounds import check_start_checkpoint, export_backbone

from conftest import REPO, job_env, tiny_config_overrides


def tiny_checkpoint(directory: Path, data_root: Path, **model) -> Path:
    """A random-init test_resnet checkpoint at 64x32 (the tiny test config's model)."""
    config = Config().replace(**{
        **tiny_config_overrides(), "data.root": str(data_root), "data.format": "market1501",
        **{f"model.{k}": v for k, v in model.items()},
    })
    return save_checkpoint(directory, build_model(config.model, num_classes=5), config, 0)


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_pseudo_label_job(tiny_market, ray_address, workspace, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_market)
    out = tmp_path / "out"
    env = job_env(ray_address, workspace)
    args = ["jobs/pseudo_label.py", "--checkpoint", str(checkpoint), "--images",
            str(tiny_market), "--method", "kmeans", "--clusters", "6", "--out", str(out),
            "--no-progress"]
    proc = run(args, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"pseudo labels: {out / 'pseudo_labels.csv'}"
    report = json.loads((out / "report.json").read_text())
    train_images = load_market1501(tiny_market).train
    assert report["num_images"] == len(train_images) and report["input_format"] == "market1501"
    assert report["method"] == "kmeans" and report["clusters"] == 6
    assert report["num_clusters"] + (report["num_outliers"] > 0) >= 2
    assert {"ari", "nmi", "purity", "num_true_ids"} <= set(report) and report["num_true_ids"] == 12
    pseudo = load_csv(out / "pseudo_labels.csv", need_test=False, allow_outside_root=True).train
    assert len(pseudo) == report["num_images"] - report["num_outliers"]
    assert {s.pid for s in pseudo} == set(range(report["num_clusters"]))
    assert {Path(s.path) for s in pseudo} <= {Path(s.path) for s in train_images}
    for name in ("cluster_sizes.png", "cluster_samples.png", "clustering_vs_truth.png"):
        assert (out / name).stat().st_size > 1000

    # Nothing the user gave is overwritten: the same --out again is refused, before any work.
    before = (out / "pseudo_labels.csv").read_bytes()
    again = run(args, env)
    assert again.returncode == 2 and "already holds pseudo_labels.csv" in again.stderr
    assert (out / "pseudo_labels.csv").read_bytes() == before


def test_pseudo_label_bad_input_is_a_clear_error(tiny_market, tmp_path, workspace, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_market)
    env = job_env("", workspace)
    env.pop("RAY_ADDRESS")
    (tmp_path / "empty" / "cam1").mkdir(parents=True)
    proc = run(["jobs/pseudo_label.py", "--checkpoint", str(checkpoint), "--images",
                str(tmp_path / "empty")], env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "empty: no images found at any depth" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray" not in proc.stderr  # refused before Ray starts

    import pseudo_label  # jobs/ is on sys.path (conftest)

    with pytest.raises(SystemExit) as exit_info:
        pseudo_label.parse_args(["--checkpoint", "c", "--images", "i", "--method", "kmeans"])
    assert exit_info.value.code == 2
    assert "--method kmeans needs --clusters N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pseudo_label.parse_args(["--checkpoint", "c", "--images", "i", "--method", "kmeans",
                                 "--clusters", "5", "--distance", "jaccard"])
    assert "--distance does not apply to --method kmeans" in capsys.readouterr().err


@pytest.mark.slow
def test_unreadable_images_are_a_clear_error(ray_session, tiny_market, tmp_path):
    from reid_platform.pseudo.labels import pseudo_label

    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_market)
    folder = tmp_path / "broken"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=r"broken: none of the 3 images could be decoded"):
        pseudo_label(checkpoint, folder, tmp_path / "out", method="kmeans", clusters=2,
                     progress=False)
    assert not (tmp_path / "out" / "pseudo_labels.csv").exists()


def test_start_checkpoint_must_match_the_configs_model(tiny_market, tmp_path):
    config = Config().replace(**tiny_config_overrides())
    other = tiny_checkpoint(tmp_path / "other", tiny_market, embedding_dim=16)
    with pytest.raises(CheckpointError, match=r"its model gives 16-d embeddings .* the config's "
                                              r"model gives \d+-d .* --set model.backbone="
                                              r"test_resnet model.embedding_dim=16"):
        check_start_checkpoint(other, config)
    same = tiny_checkpoint(tmp_path / "same", tiny_market)
    assert check_start_checkpoint(same, config) == same.resolve()
    # its backbone weights carry over to the next round's model exactly
    path = export_backbone(same, tmp_path / "backbone.pth", config)
    assert path.is_file()
    with pytest.raises(CheckpointError, match="backbone weights do not carry over"):
        export_backbone(same, tmp_path / "b2.pth",
                        config.replace(**{"model.backbone": "resnet18"}))


@pytest.mark.slow
def test_self_train_two_rounds(tiny_market, ray_address, workspace, tmp_path):
    labelled, unlabelled = split_labelled(load_market1501(tiny_market), tmp_path / "split", 0.5)
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_market)
    out = tmp_path / "rounds"
    overrides = {
        **tiny_config_overrides(), "name": "self-train-e2e", "data.format": "csv",
        "data.root": str(labelled), "data.allow_outside_root": True,  # it lists absolute paths
        "data.unlabelled": str(unlabelled), "train.epochs": 1,
        "train.batches_per_epoch": 2, "train.swa_epochs": 0, "self_train.rounds": 2,
        "self_train.method": "kmeans", "self_train.clusters": 4, "self_train.out": str(out),
    }
    proc = run(["jobs/self_train.py", "--config", "configs/demo.yaml", "--checkpoint",
                str(checkpoint), "--set", *(f"{k}={v}" for k, v in overrides.items())],
               job_env(ray_address, workspace))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("checkpoint: ")
    final = Path(lines[-1].removeprefix("checkpoint: "))
    payload = read_checkpoint(final)
    labelled_ids = len({s.pid for s in load_csv(labelled, allow_outside_root=True).train})
    # k-means asks for 4 groups; one of a single image is an outlier (min_cluster_size 2), so
    # the count comes from each round's report
    reports = {r: json.loads((out / f"round-{r}" / "report.json").read_text()) for r in (1, 2)}
    assert all(3 <= reports[r]["num_clusters"] <= 4 for r in (1, 2)), reports
    # labelled ids + the last round's pseudo ids
    assert payload["num_classes"] == labelled_ids + reports[2]["num_clusters"]
    final_config = Config.from_dict(payload["config"])
    assert final_config.data.extra_train == (str(out / "round-2" / "pseudo_labels.csv"),)
    assert final_config.model.pretrained == str(out / "round-2" / "backbone.pth")

    parent_id = next(x for x in lines if x.startswith("mlflow parent run: ")).split()[3]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["final_checkpoint"] == str(final)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(c.data.tags["self_train_round"] for c in children) == ["1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        round_report = reports[int(child.data.tags["self_train_round"])]
        assert child.data.metrics["pseudo_num_clusters"] == round_report["num_clusters"]
        names = {a.path for a in client.list_artifacts(child.info.run_id, "pseudo_labels")}
        assert "pseudo_labels/report.json" in names
    assert [m.step for m in client.get_metric_history(parent_id, "mAP")] == [0, 1, 2]
    clusters = client.get_metric_history(parent_id, "num_clusters")
    assert [(m.step, m.value) for m in clusters] == [
        (r, float(reports[r]["num_clusters"])) for r in (1, 2)]
    assert {"rounds.csv", "rounds.json", "self_train_curves.png", "config.yaml"} <= {
        a.path for a in client.list_artifacts(parent_id)}
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["run_id"] is None
    assert load_config(out / "config.yaml").self_train.rounds == 2
