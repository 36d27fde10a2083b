"""Debug mode: `train.num_workers: 0` runs the same loop in this process, without Ray."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from reid_platform.checkpoint import read_checkpoint
from reid_platform.config import Config

from conftest import tiny_config_overrides


def local_config(tiny_market, **extra) -> Config:
    return Config().replace(**{
        **tiny_config_overrides(),
        "name": "local-debug",
        "data.root": str(tiny_market),
        "data.format": "market1501",
        "train.num_workers": 0,
        "train.epochs": 2,
        "train.swa_epochs": 1,
        "train.batches_per_epoch": 3,
        **extra,
    })


def test_debug_mode_trains_in_process_with_the_same_outputs(tiny_market, workspace, capsys):
    import ray

    from reid_platform.training.trainer import run_training

    was_running = ray.is_initialized()
    result = run_training(local_config(tiny_market), progress=False)
    assert ray.is_initialized() == was_running  # no Ray started for it
    out = capsys.readouterr().out
    assert "debug mode (train.num_workers=0)" in out and "SWA phase" in out
    payload = read_checkpoint(result.checkpoint)
    assert payload["epoch"] == 2 and "optimizer" in payload["training_state"]
    assert payload["mlflow_run"] == {"tracking_uri": result.tracking_uri,
                                     "run_id": result.run_id}
    assert result.checkpoint.parent.name.startswith("local-debug-")
    assert len(list(result.checkpoint.parent.glob("checkpoint_*"))) == 1  # newest one kept
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "loss_id", "loss_triplet", "epoch"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2], key
    # the headline metrics are the SWA model's, which is the checkpoint
    assert result.metrics["mAP"] == pytest.approx(payload["metrics"]["mAP"])
    assert "pre_swa_mAP" in result.metrics


def test_debug_mode_errors_surface_as_themselves(tiny_market, workspace, monkeypatch):
    from reid_platform.training import loop
    from reid_platform.training.trainer import run_training

    def broken(*args, **kwargs):
        raise ZeroDivisionError("evaluation broke")

    monkeypatch.setattr(loop, "evaluate_model", broken)
    with pytest.raises(ZeroDivisionError, match="evaluation broke"):
        run_training(local_config(tiny_market, name="local-broken"), progress=False)
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("local-broken")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


def test_swa_longer_than_training_is_scaled_down(tiny_market, workspace, capsys):
    from reid_platform.training.trainer import scale_swa

    config = local_config(tiny_market).replace(**{"train.epochs": 12, "train.swa_epochs": 12})
    assert scale_swa(config).train.swa_epochs == 2
    assert "would average every epoch at a constant lr" in capsys.readouterr().out
    assert scale_swa(config.replace(**{"train.epochs": 1})).train.swa_epochs == 0
    keep = config.replace(**{"train.swa_epochs": 3})
    assert scale_swa(keep) is keep
