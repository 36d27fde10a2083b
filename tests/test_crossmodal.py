"""Cross-modal retrieval: modality-tagged data (CSV column, folders, synthetic optical/SAR
tiles), cross-modal PK batches, the pseudo-siamese backbone's routing, the cross-modal
losses and the two-direction protocol against hand-computed references."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_platform.config import AugmentConfig, Config, ConfigError, ModelConfig
from reid_platform.data.dataset import ImageDataset, collate_skip_corrupt
from reid_platform.data.formats import DatasetError, Sample, load_csv, load_dataset, load_folder
from reid_platform.data.sampler import PKBatchSampler
from reid_platform.data.synthetic_tiles import generate_tiles_tree
from reid_platform.data.transforms import ModalityTransforms, build_train_transform
from reid_platform.evaluation.crossmodal import cross_modal_metrics, cross_modal_split
from reid_platform.models import ModelError, build_model

SIZE = (64, 32)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return generate_tiles_tree(tmp_path_factory.mktemp("tiles") / "t", num_train_ids=6,
                               num_test_ids=3, images_per_id_per_modality=(2, 3), height=32,
                               width=32, seed=3, progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiles_are_deterministic_and_sar_is_gray_speckled(tiles, tmp_path):
    again = generate_tiles_tree(tmp_path / "t", num_train_ids=6, num_test_ids=3,
                                images_per_id_per_modality=(2, 3), height=32, width=32, seed=3,
                                progress=False)
    assert _digest(again) == _digest(tiles)
    other = generate_tiles_tree(tmp_path / "u", num_train_ids=6, num_test_ids=3,
                                images_per_id_per_modality=(2, 3), height=32, width=32, seed=4,
                                progress=False)
    assert _digest(other) != _digest(tiles)
    dataset = load_dataset(tiles, "synthetic")
    assert dataset.modalities == ("optical", "sar")
    assert {s.modality for s in dataset.query} == {"optical"}
    assert {s.modality for s in dataset.gallery} == {"sar"}
    by_pid = {}
    for s in dataset.train:
        by_pid.setdefault(s.pid, set()).add(s.modality)
    assert all(m == {"optical", "sar"} for m in by_pid.values())  # every place in both
    sar = [np.asarray(Image.open(s.path)).astype(float) for s in dataset.train
           if s.modality == "sar"]
    optical = [np.asarray(Image.open(s.path)).astype(float) for s in dataset.train
               if s.modality == "optical"]
    # grayscale (JPEG keeps the channels within a few levels) vs colour
    assert max(np.abs(a[..., 0] - a[..., 2]).mean() for a in sar) < 2.0
    assert min(np.abs(a[..., 1] - a[..., 2]).mean() for a in optical) > 5.0
    # speckle: far more pixel-to-pixel variation than the optical rendering of a place
    def roughness(a):
        return np.abs(np.diff(a[..., 0], axis=1)).mean()
    assert np.mean([roughness(a) for a in sar]) > 1.5 * np.mean([roughness(a) for a in optical])


def test_csv_modality_column_and_its_errors(tmp_path):
    Image.new("RGB", (8, 16)).save(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text(
        "path,pid,camid,split,modality\na.jpg,1,0,train,optical\na.jpg,1,1,train,sar\n"
        "a.jpg,2,0,train,optical\na.jpg,2,1,train,sar\na.jpg,3,0,query,sar\n"
        "a.jpg,3,1,gallery,optical\n")
    dataset = load_csv(tmp_path / "m.csv")
    assert [s.modality for s in dataset.train] == ["optical", "sar", "optical", "sar"]
    assert dataset.modalities == ("optical", "sar")
    (tmp_path / "bad.csv").write_text(
        "path,pid,camid,split,modality\na.jpg,1,0,train,optical\na.jpg,1,0,train,\n")
    with pytest.raises(DatasetError, match=r"bad.csv:3: modality is empty"):
        load_csv(tmp_path / "bad.csv")


def test_folder_modality_layout(tmp_path):
    for modality in ("optical", "sar"):
        for ident in ("x", "y", "z", "w"):
            folder = tmp_path / modality / ident
            folder.mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (8, 16)).save(folder / f"{n}.jpg")
    dataset = load_folder(tmp_path, test_fraction=0.5)
    assert dataset.modalities == ("optical", "sar")
    assert {s.modality for s in dataset.query} == {"optical"}
    assert {s.modality for s in dataset.gallery} == {"sar"}
    assert {s.camid for s in dataset.train} == {0, 1}  # a sensor per modality
    pids = {s.pid for s in dataset.train}
    assert len(pids) == 2 and all(
        {s.modality for s in dataset.train if s.pid == p} == {"optical", "sar"} for p in pids)


def test_batches_carry_the_modality_index_and_unknown_ones_fail(tiles):
    dataset = load_dataset(tiles, "synthetic")
    items = ImageDataset(dataset.train[:4], build_train_transform(*SIZE, AugmentConfig()),
                         ("sar", "optical"))
    batch = collate_skip_corrupt([items[i] for i in range(4)])
    expected = [1 if s.modality == "optical" else 0 for s in dataset.train[:4]]
    assert batch["modality"].tolist() == expected
    plain = ImageDataset([dataclasses.replace(s, modality="") for s in dataset.train[:2]],
                         build_train_transform(*SIZE, AugmentConfig()))
    assert "modality" not in collate_skip_corrupt([plain[0], plain[1]])
    with pytest.raises(ValueError, match=r"modality 'sar' .* branches for \['optical'\]"):
        ImageDataset(dataset.train, build_train_transform(*SIZE, AugmentConfig()), ("optical",))


def test_cross_modal_pk_batches_hold_every_identity_in_both_modalities():
    rng = np.random.default_rng(0)
    pids, modalities = [], []
    for pid in range(8):
        for modality in (0, 1):
            n = int(rng.integers(1, 6))
            pids += [pid] * n
            modalities += [modality] * n
    pids += [8, 8, 8]  # an identity seen in one modality only: left out
    modalities += [0, 0, 0]
    sampler = PKBatchSampler(pids, num_ids=3, num_instances=4, modalities=modalities, seed=1)
    batches = list(sampler)
    assert batches
    for batch in batches:
        by_pid: dict[int, list[int]] = {}
        for index in batch:
            by_pid.setdefault(pids[index], []).append(modalities[index])
        assert len(by_pid) == 3 and 8 not in by_pid
        assert all(sorted(m) == [0, 0, 1, 1] for m in by_pid.values())
    with pytest.raises(ValueError, match=r"K=data.num_instances=3 must be a multiple"):
        PKBatchSampler(pids, num_ids=3, num_instances=3, modalities=modalities)
    with pytest.raises(ValueError, match=r"1 modality"):
        PKBatchSampler(pids, num_ids=3, num_instances=4, modalities=[0] * len(pids))
    with pytest.raises(ValueError, match=r"P=9 identities in every modality, the data has 8"):
        PKBatchSampler(pids, num_ids=9, num_instances=4, modalities=modalities)


def test_channel_exchange_only_on_the_asked_modality():
    augment = AugmentConfig(flip_p=0.0, pad=0, erasing_p=0.0, channel_exchange_p=1.0,
                            channel_exchange_modality="optical")
    transform = build_train_transform(*SIZE, augment)
    assert isinstance(transform, ModalityTransforms)
    image = np.zeros((*SIZE, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 30, 120, 220
    plain = build_train_transform(*SIZE, dataclasses.replace(augment, channel_exchange_p=0.0,
                                                             channel_exchange_modality=""))
    reference = plain(image=image)["image"]
    assert all(torch.equal(transform(image, "sar")["image"], reference) for _ in range(10))
    assert any(not torch.equal(transform(image, "optical")["image"], reference)
               for _ in range(10))


def _model(n: int, **extra) -> torch.nn.Module:
    config = ModelConfig(backbone="test_resnet", pretrained="", modality_specific_stages=n,
                         modalities=("optical", "sar"), **extra)
    return build_model(config, 4, SIZE)


def test_pseudo_siamese_routing_keeps_modalities_apart():
    torch.manual_seed(0)
    model = _model(2)
    model.train()
    images = torch.randn(4, 3, *SIZE)
    out = model(images, torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long))
    out.embedding("pre_bn").sum().backward()
    sar, optical = model.trunk.specific[1], model.trunk.specific[0]
    assert all(p.grad is not None and not p.grad.any() for p in sar.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in optical.parameters())
    assert all(p.grad is not None for p in model.trunk.shared.parameters())
    # a mixed batch: each sample's features are what its own branch alone gives
    model.eval()
    mixed = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        together = model.embed(images, mixed)
        alone = torch.cat([model.embed(images[i:i + 1], mixed[i:i + 1]) for i in range(4)])
        assert torch.allclose(together, alone, atol=1e-5)
        with torch.no_grad():  # another branch's weights change only its samples
            for p in sar.parameters():
                p.add_(0.5)
        changed = model.embed(images, mixed)
    assert torch.allclose(changed[mixed == 0], together[mixed == 0], atol=1e-6)
    assert not torch.allclose(changed[mixed == 1], together[mixed == 1], atol=1e-3)
    # the parameter groups: the copies train with the backbone
    backbone = {id(p) for p in model.backbone_parameters()}
    assert all(id(p) in backbone for p in sar.parameters())


def test_zero_specific_stages_is_the_shared_model():
    torch.manual_seed(0)
    shared = build_model(ModelConfig(backbone="test_resnet", pretrained=""), 4, SIZE)
    zero = _model(0)
    assert zero.trunk is None
    zero.load_state_dict(shared.state_dict())
    siamese = _model(3)
    siamese.load_state_dict(shared.state_dict(), strict=False)  # copies keep their own init
    images = torch.randn(3, 3, *SIZE)
    shared.eval(), zero.eval(), siamese.eval()
    with torch.no_grad():
        reference = shared.embed(images)
        assert torch.allclose(zero.embed(images, torch.tensor([0, 1, 1])), reference)
        # the first modality's branch is the backbone itself
        assert torch.allclose(siamese.embed(images, torch.zeros(3, dtype=torch.long)),
                              reference, atol=1e-6)
        assert torch.allclose(siamese.embed(images), reference, atol=1e-6)


def test_pseudo_siamese_bad_settings_name_the_value():
    with pytest.raises(ModelError, match=r"modality_specific_stages=5 is more than the 4"):
        _model(5)
    with pytest.raises(ModelError, match=r"modality_specific_stages=2 needs two or more"):
        build_model(ModelConfig(backbone="test_resnet", pretrained="",
                                modality_specific_stages=2), 4, SIZE)
    with pytest.raises(ModelError, match=r"MGN"):
        _model(1, arch="mgn")
    with pytest.raises(ModelError, match=r"defined stages"):
        build_model(ModelConfig(backbone="test_vit", pretrained="", modality_specific_stages=1,
                                modalities=("a", "b")), 4, SIZE)
    assert _model(1, arch="pcb", pcb_stripes=2).trunk is not None


def test_cross_modal_metrics_against_a_hand_computed_reference():
    # optical queries a1 (pid 1), a2 (pid 2); sar gallery b1 (pid 1), b2 (pid 2), b3 (pid 1)
    feats_a = np.array([[1, 0], [0, 1]], np.float32)
    feats_b = np.array([[0.6, 0.8], [0.8, 0.6], [1, 0]], np.float32)
    pids_a, pids_b = np.array([1, 2]), np.array([1, 2, 1])
    metrics, forward, reverse = cross_modal_metrics(feats_a, pids_a, feats_b, pids_b)
    # a1: cosine distances to b = [0.4, 0.2, 0] -> ranking b3(+), b2(-), b1(+): AP = (1 + 2/3)/2
    # a2: distances [0.2, 0.4, 1] -> b1(-), b2(+), b3(-): AP = 1/2, rank-1 miss
    assert metrics["rank1"] == pytest.approx(0.5)
    assert metrics["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    # reverse: b1 -> [a1 0.4, a2 0.2]: miss, AP 1/2; b2 -> [0.2, 0.4]: miss, AP 1/2;
    # b3 -> [0, 1]: hit, AP 1
    assert metrics["reverse_rank1"] == pytest.approx(1 / 3)
    assert metrics["reverse_mAP"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    forward_score = 0.5 * metrics["rank1"] + 0.5 * metrics["mAP"]
    reverse_score = 0.5 * metrics["reverse_rank1"] + 0.5 * metrics["reverse_mAP"]
    assert metrics["forward_score"] == pytest.approx(forward_score)
    assert metrics["score"] == pytest.approx(0.5 * (forward_score + reverse_score))


def test_cross_modal_split_errors_name_the_modality(tiles):
    dataset = load_dataset(tiles, "synthetic")
    split = cross_modal_split(dataset)
    assert (split.query_modality, split.gallery_modality) == ("optical", "sar")
    assert len(split.query) + len(split.gallery) == len(dataset.query) + len(dataset.gallery)
    reverse = cross_modal_split(dataset, "sar", "optical")
    assert reverse.query == split.gallery
    with pytest.raises(ValueError, match=r"data.gallery_modality='infrared' has no test"):
        cross_modal_split(dataset, "optical", "infrared")
    with pytest.raises(ValueError, match=r"both 'sar'"):
        cross_modal_split(dataset, "sar", "sar")


def test_driver_checks_modalities_against_the_data(tiles):
    from reid_platform.data.root import resolve_modalities

    dataset = load_dataset(tiles, "synthetic")
    base = Config().replace(**{"data.root": str(tiles), "data.format": "synthetic",
                               "model.backbone": "test_resnet", "model.pretrained": ""})
    filled = resolve_modalities(base, dataset)
    assert filled.model.modalities == ("optical", "sar")
    with pytest.raises(ConfigError, match=r"modality 'sar' but model.modalities=\['optical'\]"):
        resolve_modalities(base.replace(**{"model.modalities": ["optical"]}), dataset)
    with pytest.raises(ConfigError, match=r"data.query_modality='infrared' has no test"):
        resolve_modalities(base.replace(**{"data.protocol": "cross_modal",
                                           "data.query_modality": "infrared"}), dataset)
    unimodal = dataclasses.replace(dataset, train=[dataclasses.replace(s, modality="")
                                                   for s in dataset.train],
                                   query=[dataclasses.replace(s, modality="")
                                          for s in dataset.query],
                                   gallery=[dataclasses.replace(s, modality="")
                                            for s in dataset.gallery])
    with pytest.raises(ConfigError, match=r"two or more modalities"):
        resolve_modalities(base.replace(**{"data.cross_modal_sampling": True}), unimodal)
    assert Sample("x", 1, 0, "train").modality == ""


# ---- losses ----------------------------------------------------------------------------------


def test_cross_modal_triplet_mines_in_the_other_modality_only():
    from reid_platform.losses import TripletLoss

    # 1-D features: pid 1 at 0 (optical) and 1 (sar), 0.1 (optical); pid 2 at 3 (sar), 0.2 (opt)
    feats = torch.tensor([[0.0], [1.0], [0.1], [3.0], [0.2]])
    pids = torch.tensor([1, 1, 1, 2, 2])
    modality = torch.tensor([0, 1, 0, 1, 0])
    loss = TripletLoss(margin=0.5)
    # anchor 0 (opt, pid 1): positives in sar {1: 1.0}, negatives in sar {3: 3.0} -> 0
    # anchor 1 (sar, pid 1): positives in opt {0: 1.0, 2: 0.9} -> 1.0; negatives {4: 0.8}
    #   -> relu(1.0 - 0.8 + 0.5) = 0.7
    # anchor 2 (opt, pid 1): pos {1: 0.9}, neg {3: 2.9} -> 0
    # anchor 3 (sar, pid 2): pos {4: 2.8}; neg {0: 3.0, 2: 2.9} -> 2.9: relu(2.8-2.9+.5)=0.4
    # anchor 4 (opt, pid 2): pos {3: 2.8}; neg {1: 0.8} -> relu(2.8 - 0.8 + 0.5) = 2.5
    expected = (0 + 0.7 + 0 + 0.4 + 2.5) / 5
    assert float(loss(feats, pids, modality)) == pytest.approx(expected, abs=1e-4)
    assert float(loss(feats, pids)) != pytest.approx(expected, abs=1e-3)  # plain mining differs


def test_gradient_reversal_and_the_adversarial_term():
    from reid_platform.losses import ReidLoss, reverse_gradient
    from reid_platform.models import BranchOutput, BranchSpec, ReidOutput

    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(3)
    (reverse_gradient(x, 0.5) @ weights).sum().backward()
    assert torch.allclose(x.grad, -0.5 * weights.expand(4, 3))

    torch.manual_seed(0)
    branches = (BranchSpec("global", 8),)
    config = Config().loss
    config = dataclasses.replace(config, adversarial_weight=0.5, adversarial_lr=1e-2,
                                 adversarial_hidden=16)
    criterion = ReidLoss(config, 4, branches)
    assert "adversarial" in criterion.optimizers  # its own optimizer step
    term = criterion.terms["adversarial"]
    assert not any(id(p) in {id(q) for q in term.parameters()}
                   for p in criterion.model_parameters())
    modality = torch.tensor([0, 1] * 8)
    features = torch.randn(16, 8) + 2.0 * modality[:, None].float()  # separable modalities
    features.requires_grad_(True)

    def step():
        out = ReidOutput([BranchOutput(features, features, torch.randn(16, 4))])
        batch = {"pid": torch.arange(16) % 4, "modality": modality}
        criterion.zero_grad()
        features.grad = None
        losses = criterion(out, batch)
        return losses

    losses = step()
    assert "adversarial" in losses.terms  # logged as loss_adversarial by the loop
    losses.total.backward()
    # the model's gradient is the reversed, weighted gradient of the discriminator's loss
    probe = features.detach().clone().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(term.discriminator(probe), modality)
    (grad_plain,) = torch.autograd.grad(0.5 * plain, probe)
    total_grad = features.grad.clone()
    # the adversarial term alone (the id and triplet terms add their own gradients)
    alone = ReidLoss(config, 4, branches, terms=[term])
    features.grad = None
    alone(ReidOutput([BranchOutput(features, features, None)]), {"pid": torch.arange(16) % 4,
                                                                 "modality": modality}
          ).total.backward()
    assert torch.allclose(features.grad, -grad_plain, atol=1e-6)
    assert not torch.allclose(total_grad, features.grad)
    # the discriminator learns the (separable) modalities with its own steps
    first = float(step().terms["adversarial"].detach())
    for _ in range(40):
        losses = step()
        losses.total.backward()
        criterion.step()
    assert float(step().terms["adversarial"].detach()) < 0.5 * first
    with pytest.raises(ValueError, match=r"loss.adversarial_weight needs cross-modal data"):
        criterion(ReidOutput([BranchOutput(features, features, torch.randn(16, 4))]),
                  {"pid": torch.arange(16) % 4})


# ---- jobs/evaluate.py --------------------------------------------------------------------------


def test_evaluate_job_scores_both_directions_with_pictures(tiles, tmp_path, workspace):
    import json
    import subprocess
    import sys

    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.evaluation.crossmodal import cross_modal_metrics
    from reid_platform.evaluation.embed import extract_features

    from conftest import REPO

    config = Config().replace(**{
        "workspace": str(workspace), "model.backbone": "test_resnet", "model.pretrained": "",
        "model.modality_specific_stages": 1, "model.modalities": ["optical", "sar"],
        "data.root": str(tiles / "manifest.csv"), "data.format": "csv", "data.height": SIZE[0],
        "data.width": SIZE[1], "data.protocol": "cross_modal", "data.loader_workers": 0,
    })
    torch.manual_seed(0)
    model = build_model(config.model, 6, SIZE)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, config, 0)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--checkpoint", str(checkpoint), "--out", str(out),
         "--no-mlflow", "--device", "cpu", "--feature", "pre_bn", "--scatter", "pca"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "optical -> sar" in proc.stdout and "sar -> optical" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    values = report["variants"]["raw"]
    # the same numbers as embedding both sides here and scoring them directly
    split = cross_modal_split(load_dataset(tiles, "synthetic"))
    a = extract_features(model, split.query, *SIZE, modalities=("optical", "sar"),
                         feature="pre_bn")
    b = extract_features(model, split.gallery, *SIZE, modalities=("optical", "sar"),
                         feature="pre_bn")
    expected, _, _ = cross_modal_metrics(a.feats, a.pids, b.feats, b.pids)
    for key in ("rank1", "mAP", "reverse_rank1", "reverse_mAP", "score"):
        assert values[key] == pytest.approx(expected[key], abs=1e-6), key
    for picture in ("embedding_modalities.png", "pair_distances.png", "cmc.png"):
        assert (out / picture).stat().st_size > 1000
    assert report["dataset"]["feature"] == "pre_bn"
    # a side without images: the error names the key and the value (the job prints it)
    from reid_platform.evaluation.metrics import EvaluationError
    from reid_platform.evaluation.pipeline import read_checkpoint_input, run_evaluation
    from reid_platform.evaluation.variants import EvalOptions

    stored = read_checkpoint_input(checkpoint)
    stored = dataclasses.replace(stored, config=stored.config.replace(
        **{"data.gallery_modality": "infrared"}))
    with pytest.raises(EvaluationError, match=r"data.gallery_modality='infrared' has no test"):
        run_evaluation([stored], EvalOptions(), tmp_path / "bad", device="cpu", progress=False)


def test_sweeps_search_the_cross_modal_keys():
    from reid_platform.config import load_config
    from reid_platform.tuning import apply_params, search_space

    config = load_config(None, [
        "tune.space={model.modality_specific_stages: {type: choice, values: [0, 1, 2]}, "
        "loss.adversarial_weight: {type: uniform, low: 0.0, high: 0.5}, "
        "data.augment.channel_exchange_p: {type: uniform, low: 0.0, high: 1.0}}"])
    assert set(search_space(config.tune)) == {"model.modality_specific_stages",
                                              "loss.adversarial_weight",
                                              "data.augment.channel_exchange_p"}
    trial = apply_params(config, {"model.modality_specific_stages": 2,
                                  "loss.adversarial_weight": 0.2,
                                  "data.augment.channel_exchange_p": 0.7})
    assert trial.model.modality_specific_stages == 2
    assert trial.loss.adversarial_weight == 0.2
    assert trial.data.augment.channel_exchange_p == 0.7
