"""Warm-up + cosine/multistep/SWA learning-rate factors, SWA averaging and BN re-estimation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reid_platform.config import TrainConfig
from reid_platform.training.schedule import WarmupSchedule
from reid_platform.training.swa import make_swa_model, recompute_batchnorm

# ---- schedule ------------------------------------------------------------------------------


def test_warmup_then_cosine():
    s = WarmupSchedule(epochs=100, warmup_epochs=10, warmup_factor=0.01)
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s(9.999) == pytest.approx(1.0, abs=1e-3)
    assert s(10) == pytest.approx(1.0)  # warm-up end = cosine start
    assert s(55) == pytest.approx(0.5)  # cosine midpoint
    assert s(32.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(150) == pytest.approx(0.0, abs=1e-12)  # clipped past the end


def test_cosine_floor():
    s = WarmupSchedule(epochs=100, warmup_epochs=10, min_factor=0.1)
    assert s(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(100) == pytest.approx(0.1)


def test_no_warmup_starts_at_one():
    s = WarmupSchedule(epochs=20, warmup_epochs=0)
    assert s(0) == pytest.approx(1.0)
    assert s(10) == pytest.approx(0.5)
    assert s(20) == pytest.approx(0.0, abs=1e-12)


def test_multistep_boundaries():
    s = WarmupSchedule(
        epochs=120, kind="multistep", warmup_epochs=10, milestones=(40, 70), gamma=0.1
    )
    assert s(0) == pytest.approx(0.01)
    assert s(10) == pytest.approx(1.0)
    assert s(39.99) == pytest.approx(1.0)
    assert s(40) == pytest.approx(0.1)
    assert s(69.99) == pytest.approx(0.1)
    assert s(70) == pytest.approx(0.01)
    assert s(119) == pytest.approx(0.01)


def test_swa_constant_phase():
    s = WarmupSchedule(epochs=100, warmup_epochs=10, swa_epochs=10, swa_factor=0.05)
    assert s.decay_epochs == 90
    assert s(50) == pytest.approx(0.5)  # cosine spans warm-up end .. SWA start
    assert s(89.999) == pytest.approx(0.0, abs=1e-6)
    for epoch in (90, 93.5, 99.99, 100):
        assert s(epoch) == pytest.approx(0.05)

    multistep = WarmupSchedule(
        epochs=50, kind="multistep", warmup_epochs=0, milestones=(20,), swa_epochs=5, swa_factor=0.3
    )
    assert multistep(44.9) == pytest.approx(0.1)
    assert multistep(45) == pytest.approx(0.3)


def test_unknown_kind():
    with pytest.raises(ValueError, match="'linear'"):
        WarmupSchedule(epochs=10, kind="linear")


def test_from_config():
    train = TrainConfig(
        epochs=60,
        scheduler="multistep",
        warmup_epochs=5,
        warmup_factor=0.1,
        milestones=(20, 40),
        gamma=0.5,
        min_lr_factor=0.2,
        swa_epochs=4,
        swa_lr_factor=0.25,
    )
    s = WarmupSchedule.from_config(train)
    assert s == WarmupSchedule(
        epochs=60,
        kind="multistep",
        warmup_epochs=5,
        warmup_factor=0.1,
        milestones=(20, 40),
        gamma=0.5,
        min_factor=0.2,
        swa_epochs=4,
        swa_factor=0.25,
    )
    assert s(0) == pytest.approx(0.1)
    assert s(30) == pytest.approx(0.5)
    assert s(56) == pytest.approx(0.25)


def test_from_config_shortens_warmup_of_short_runs():
    # 3 epochs with 10 warm-up epochs: warm-up must end before the last epoch
    s = WarmupSchedule.from_config(TrainConfig(epochs=3, warmup_epochs=10))
    assert s.warmup_epochs == 2
    assert s(2) == pytest.approx(1.0)
    s = WarmupSchedule.from_config(TrainConfig(epochs=1, warmup_epochs=10))
    assert s.warmup_epochs == 0 and s(0) == pytest.approx(1.0)


# ---- SWA -----------------------------------------------------------------------------------


def small_net() -> nn.Sequential:
    # (B, 3, 8, 8) -> conv (B, 4, 6, 6) -> BN2d -> pool (B, 4) -> linear (B, 5) -> BN1d
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
    )


@pytest.mark.parametrize("num_snapshots", [1, 2, 5])
def test_swa_average_is_mean_of_snapshots(num_snapshots):
    torch.manual_seed(num_snapshots)
    model = small_net()
    swa = make_swa_model(model)
    snapshots = []
    for _ in range(num_snapshots):
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn_like(param))
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        swa.update_parameters(model)
    assert int(swa.n_averaged) == num_snapshots
    averaged = dict(swa.module.named_parameters())
    for name, _ in model.named_parameters():
        want = torch.stack([snap[name] for snap in snapshots]).mean(dim=0)
        torch.testing.assert_close(averaged[name].detach(), want)


def test_recompute_batchnorm_uses_data_statistics():
    torch.manual_seed(0)
    swa = make_swa_model(small_net())
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(3)]
    bn2d, bn1d = swa.module[1], swa.module[6]
    for bn in (bn2d, bn1d):  # stale statistics that must be replaced
        bn.running_mean.fill_(50.0)
        bn.running_var.fill_(50.0)
    seen: dict[nn.Module, list[torch.Tensor]] = {bn2d: [], bn1d: []}
    hooks = [
        bn.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach()))
        for bn in seen
    ]
    recompute_batchnorm(swa, iter(batches), torch.device("cpu"))
    for hook in hooks:
        hook.remove()

    # features entering the first BN, computed independently of the hooks
    with torch.no_grad():
        conv_out = [swa.module[0](x) for x in batches]  # (B, 4, 6, 6) each
    for got, want in zip(seen[bn2d], conv_out):
        torch.testing.assert_close(got, want)
    # cumulative average over batches of the batch mean / unbiased batch variance
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in conv_out]).mean(0)
    want_var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in conv_out]).mean(0)
    torch.testing.assert_close(bn2d.running_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn2d.running_var, want_var, rtol=1e-5, atol=1e-5)

    assert len(seen[bn1d]) == len(batches)
    want_mean = torch.stack([f.mean(dim=0) for f in seen[bn1d]]).mean(0)
    want_var = torch.stack([f.var(dim=0) for f in seen[bn1d]]).mean(0)
    torch.testing.assert_close(bn1d.running_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn1d.running_var, want_var, rtol=1e-5, atol=1e-5)
    # equal batch sizes: the cumulative average is the mean over all the data
    all_feats = torch.cat(seen[bn1d])
    torch.testing.assert_close(bn1d.running_mean, all_feats.mean(0), rtol=1e-5, atol=1e-5)
    assert bn1d.momentum == 0.1  # restored after the re-estimation
