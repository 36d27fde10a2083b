"""Model contract over backbones x poolings x heads; heads vs hand formulas; checkpoints;
the torchvision import guard; augmentation pipelines."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_platform.checkpoint import (
    CheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from reid_platform.config import AugmentConfig, Config, ModelConfig
from reid_platform.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelExchange,
    RandomPatch,
    RandomShift,
    build_eval_transform,
    build_train_transform,
)
from reid_platform.models import (
    HEADS,
    POOLINGS,
    ArcFaceHead,
    BranchOutput,
    BranchSpec,
    CosFaceHead,
    GeM,
    ModelError,
    ReidModel,
    ReidOutput,
    build_model,
    concat_embedding,
    create_backbone,
)

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ["test_resnet", "resnet18", "test_vit"]
NUM_CLASSES = 5

# Every pooling x head on the tiny ResNet; the heavier backbones on a diagonal that still
# covers every pooling and head once.
COMBOS = [("test_resnet", p, h) for p, h in itertools.product(POOLINGS, HEADS)] + [
    (backbone, POOLINGS[i % len(POOLINGS)], list(HEADS)[i % len(HEADS)])
    for backbone in BACKBONES[1:]
    for i in range(len(HEADS))
    if backbone == "test_vit" or i < 2
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(backbone: str = "test_resnet", **kwargs) -> ModelConfig:
    return ModelConfig(backbone=backbone, **kwargs)


def images(batch: int = 4, height: int = 64, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---- contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone,pooling,head", COMBOS)
def test_model_contract(backbone, pooling, head):
    torch.manual_seed(0)
    embedding_dim = 24 if head == "cosface" else 0
    model = build_model(
        model_config(backbone, pooling=pooling, head=head, embedding_dim=embedding_dim),
        NUM_CLASSES,
    )
    x = images()
    pids = torch.tensor([0, 1, 4, 1])

    out = model(x, pids)
    assert isinstance(out, ReidOutput)
    dim = model.embedding_dim
    assert dim == (embedding_dim or model.backbone.num_features)
    assert [b.dim for b in model.branches] == [dim] and len(out.branches) == 1
    (branch,) = out.branches
    assert branch.features.shape == branch.bn_features.shape == (4, dim)
    assert branch.logits.shape == (4, NUM_CLASSES)
    for tensor in (branch.features, branch.bn_features, branch.logits):
        assert torch.isfinite(tensor).all()

    loss = F.cross_entropy(branch.logits, pids) + branch.features.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.weight.grad is not None
    assert model.bnneck.bias.grad is None  # BNNeck shift is frozen

    model.eval()
    with torch.no_grad():
        out_eval = model(x)
        emb = model.embed(x)
        want = F.normalize(model.bnneck(model.features(x)), dim=1)
    assert isinstance(out_eval, ReidOutput)  # same return type in eval mode
    assert out_eval.branches[0].logits.shape == (4, NUM_CLASSES)
    assert emb.shape == (4, dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb, want)
    torch.testing.assert_close(emb, F.normalize(out_eval.branches[0].bn_features, dim=1))
    with torch.no_grad():
        pre = model.embed(x, feature="pre_bn")
    torch.testing.assert_close(pre, F.normalize(model.features(x), dim=1))


class TwoBranchModel(ReidModel):
    """A minimal part model: a global branch and a two-stripe branch over one tiny CNN."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.config, self.num_classes = ModelConfig(backbone="test_resnet"), num_classes
        self.backbone = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.necks = torch.nn.ModuleList(torch.nn.BatchNorm1d(d) for d in (6, 12))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d, num_classes) for d in (6, 12))
        self.branches = (BranchSpec("global", 6), BranchSpec("stripes", 12, metric=False))

    def forward_branches(self, images, pids=None, modality=None, logits=True):
        x = self.backbone(images)  # (B, 6, H, W)
        stripes = torch.nn.functional.adaptive_avg_pool2d(x, (2, 1)).flatten(1)  # (B, 12)
        out = []
        for f, neck, head in zip((x.mean(dim=(2, 3)), stripes), self.necks, self.heads):
            bn = neck(f)
            out.append(BranchOutput(f, bn, head(bn) if logits else None))
        return out


def test_several_branches_share_one_contract():
    """Embedding = every branch's post-BNNeck features concatenated, then L2-normalised."""
    torch.manual_seed(0)
    model = TwoBranchModel(NUM_CLASSES)
    x = images()
    out = model(x, torch.tensor([0, 1, 2, 3]))
    assert [b.logits.shape for b in out.branches] == [(4, NUM_CLASSES)] * 2
    assert model.embedding_dim == 18
    model.eval()
    with torch.no_grad():
        out = model(x)
        emb = model.embed(x)
    want = torch.cat([out.branches[0].bn_features, out.branches[1].bn_features], dim=1)
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(emb, want)
    torch.testing.assert_close(out.embedding(), want)
    torch.testing.assert_close(concat_embedding([b.bn_features for b in out.branches]), want)
    with pytest.raises(ModelError, match="feature='after'"):
        out.embedding("after")


def test_unknown_arch_is_named():
    with pytest.raises(ModelError, match=r"model.arch='mgnx'.*choose one of \['bot'"):
        build_model(dataclasses.replace(model_config(), arch="mgnx"), NUM_CLASSES)


@pytest.mark.parametrize("backbone", ["resnet18", "test_resnet"])
def test_last_stride_one_doubles_the_final_map(backbone):
    x = images(1, 64, 64)
    maps = {}
    for stride in (1, 2):
        model = build_model(model_config(backbone, last_stride=stride), NUM_CLASSES).eval()
        with torch.no_grad():
            maps[stride] = model.backbone.forward_features(x).shape
    assert maps[2][2:] == (2, 2)
    assert maps[1][2:] == (4, 4)
    assert maps[1][1] == maps[2][1]


def test_last_stride_ignored_without_layer4():
    model = build_model(model_config("test_vit", last_stride=1), NUM_CLASSES)
    assert model(images(2)).branches[0].features.shape == (2, model.backbone.num_features)


# ---- pooling and heads ---------------------------------------------------------------------


def test_gem_pooling():
    x = torch.rand(2, 3, 4, 5) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(GeM(p=3.0)(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    big = torch.rand(1, 2, 3, 3)
    big[0, 0, 1, 1] = 100.0
    assert GeM(p=8.0)(big)[0, 0] > big[0, 0].mean() * 5  # large p tends to max pooling
    assert not GeM(learnable=False).p.requires_grad and GeM(learnable=True).p.requires_grad


def test_gem_p1_model_equals_average_pooling():
    torch.manual_seed(0)
    avg = build_model(model_config(pooling="avg"), NUM_CLASSES).eval()
    gem = build_model(model_config(pooling="gem", gem_p=1.0), NUM_CLASSES).eval()
    missing, unexpected = gem.load_state_dict(avg.state_dict(), strict=False)
    assert missing == ["pool.p"] and not unexpected
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(gem.features(x), avg.features(x), atol=1e-5, rtol=1e-5)


def ref_cosines(x: torch.Tensor, weight: torch.Tensor) -> list[list[float]]:
    rows, ws = x.double().tolist(), weight.detach().double().tolist()

    def cos(a, b):
        dot = sum(u * v for u, v in zip(a, b))
        return dot / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    return [[cos(r, w) for w in ws] for r in rows]


def test_cosface_margin_only_on_targets():
    torch.manual_seed(1)
    head = CosFaceHead(8, NUM_CLASSES, scale=30.0, margin=0.35).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    pids = torch.tensor([0, 4, 2, 2, 1, 3])
    cos = ref_cosines(x, head.weight)
    want = [
        [30.0 * (c - (0.35 if j == pids[i] else 0.0)) for j, c in enumerate(row)]
        for i, row in enumerate(cos)
    ]
    torch.testing.assert_close(head(x, pids), torch.tensor(want, dtype=torch.float64))
    no_margin = torch.tensor([[30.0 * c for c in row] for row in cos], dtype=torch.float64)
    torch.testing.assert_close(head(x), no_margin)


def test_arcface_margin_only_on_targets():
    torch.manual_seed(2)
    margin, scale = 0.5, 16.0
    head = ArcFaceHead(8, NUM_CLASSES, scale=scale, margin=margin).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    pids = torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad():  # make the last sample point away from its class: fallback branch
        x[5] = -head.weight[3] + 0.01 * x[5]
    cos = ref_cosines(x, head.weight)
    threshold = math.cos(math.pi - margin)
    want = []
    for i, row in enumerate(cos):
        out = []
        for j, c in enumerate(row):
            if j == pids[i]:
                if c > threshold:
                    c = math.cos(math.acos(c) + margin)
                else:
                    c = c - math.sin(math.pi - margin) * margin
            out.append(scale * c)
        want.append(out)
    assert cos[5][3] < threshold  # the fallback really is exercised
    torch.testing.assert_close(head(x, pids), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(head(x), scale * torch.tensor(cos, dtype=torch.float64))


def test_model_head_uses_config_scale_and_margin():
    model = build_model(model_config(head="cosface", head_scale=10.0, head_margin=0.2), 3)
    assert (model.head.scale, model.head.margin) == (10.0, 0.2)


# ---- construction errors and pretrained weights --------------------------------------------


def test_unknown_backbone_lists_similar_names():
    with pytest.raises(ModelError, match=r"'resnet_50x' is not a timm model.*resnet") as info:
        create_backbone("resnet_50x")
    assert "similar names: [" in str(info.value)
    with pytest.raises(ModelError, match=r"did you mean 'resnet18'\?"):
        create_backbone("resnet_18")


@pytest.mark.parametrize(
    "change,match",
    [({"pooling": "max"}, "model.pooling='max'"), ({"head": "softmax"}, "model.head='softmax'")],
)
def test_bad_model_settings(change, match):
    with pytest.raises(ModelError, match=re.escape(match)):
        build_model(dataclasses.replace(model_config(), **change), NUM_CLASSES)


def test_zero_classes():
    with pytest.raises(ModelError, match="num_classes"):
        build_model(model_config(), 0)


@pytest.mark.parametrize("with_classifier", [False, True])
def test_pretrained_from_local_file(tmp_path, with_classifier):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=7 if with_classifier else 0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(model_config(pretrained=str(path)), NUM_CLASSES)
    loaded = model.backbone.state_dict()
    for name, value in source.state_dict().items():
        if name.startswith("fc."):
            assert name not in loaded  # the ImageNet classifier is dropped
            continue
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    with pytest.raises(ModelError, match="no such weights file"):
        create_backbone("test_resnet", str(tmp_path / "missing.pth"))


# ---- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    weights = tmp_path / "imagenet.pth"
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    config = Config(name="ck").replace(
        **{
            "model.backbone": "test_resnet",
            "model.pretrained": str(weights),
            "model.pooling": "gem",
            "model.head": "arcface",
            "model.embedding_dim": 16,
        }
    )
    model = build_model(config.model, NUM_CLASSES)
    model.train()
    with torch.no_grad():
        model(images(8, seed=1))  # move the BatchNorm running statistics off their init
    model.eval()
    x = images(seed=2)
    with torch.no_grad():
        want = model.embed(x)

    directory = save_checkpoint(
        tmp_path / "ck", model, config, epoch=3, metrics={"rank1": 0.5}, training_state={"step": 7}
    )
    assert sorted(p.name for p in directory.iterdir()) == ["model.pt"]  # no temp file left
    weights.unlink()  # loading must not need the ImageNet file again
    for path in (directory, directory / "model.pt"):
        loaded, loaded_config = load_model(path)
        assert loaded_config == config
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded.embed(x), want, rtol=0, atol=0)
    payload = read_checkpoint(directory)
    assert payload["epoch"] == 3 and payload["metrics"] == {"rank1": 0.5}
    assert payload["training_state"] == {"step": 7} and payload["num_classes"] == NUM_CLASSES


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nowhere"))):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "empty")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.pt").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match=re.escape(str(damaged / "model.pt")) + ".*cannot"):
        load_model(damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a reid-platform checkpoint"):
        load_model(foreign)


# ---- torchvision guard ---------------------------------------------------------------------


def start_python(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_torchvision_guard():
    # both interpreters start at once: the imports dominate the run time
    guarded = start_python(
        "from reid_platform.torchvision_guard import ensure_torchvision_importable\n"
        "needed = ensure_torchvision_importable()\n"
        "assert ensure_torchvision_importable() is False  # idempotent\n"
        "import torchvision, timm\n"
        "print('needed' if needed else 'not-needed')\n"
    )
    bare = start_python("import torchvision")
    guarded_out, guarded_err = guarded.communicate(timeout=120)
    _, bare_err = bare.communicate(timeout=120)
    assert guarded.returncode == 0, guarded_err
    if guarded_out.strip() == "not-needed":
        pytest.skip("torchvision's compiled ops load here: the guard is not needed")
    assert bare.returncode != 0
    assert "torchvision::nms" in bare_err


# ---- transforms ----------------------------------------------------------------------------

AUGMENTATIONS = [f.name for f in dataclasses.fields(AugmentConfig)]
ALL_OFF = AugmentConfig(**{name: 0 for name in AUGMENTATIONS})
ALL_ON = AugmentConfig(**{name: (10 if name == "pad" else 1.0) for name in AUGMENTATIONS})


def person(height: int = 128, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_train_pipeline_all_on_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform = build_train_transform(128, 64, ALL_ON)
        names = [type(t).__name__ for t in transform.transforms]
        for n in range(3):
            out = transform(image=person(seed=n))["image"]
            assert out.shape == (3, 128, 64) and out.dtype == torch.float32
    for expected in (
        "HorizontalFlip",
        "PadIfNeeded",
        "RandomCrop",
        "ColorJitter",
        "RandomBrightnessContrast",
        "ChannelExchange",
        "RandomShift",
        "RandomPatch",
        "Erasing",
        "Normalize",
    ):
        assert expected in names


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("size", [(128, 64), (64, 32)])
def test_each_augmentation_alone(name, size):
    """Each augmentation, switched on alone, changes the image (a no-op would fail), keeps
    its size and normalisation, and differs between two draws of the same image."""
    height, width = size
    augment = dataclasses.replace(ALL_OFF, **{name: 10 if name == "pad" else 1.0})
    transform = build_train_transform(height, width, augment)
    plain = build_eval_transform(height, width)
    transform.set_random_seed(0)
    if name == "random_patch_p":  # it pastes once its pool holds min_pool patches
        for n in range(100):
            transform(image=person(height, width, seed=100 + n))
    changed, varied = 0, 0
    for n in range(4):
        image = person(height, width, seed=n)
        out = transform(image=image)["image"]
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (3, height, width) and torch.isfinite(out).all()
        baseline = plain(image=image)["image"]
        changed += not torch.allclose(out, baseline)
        varied += not torch.allclose(out, transform(image=image)["image"])
        if name == "flip_p":  # exactly the mirror image
            torch.testing.assert_close(out, baseline.flip(-1))
    assert changed >= 3, f"{name} left {4 - changed} of 4 images unchanged"
    if name != "flip_p":  # a flip with p=1 is deterministic
        assert varied >= 2, f"{name} gave the same output twice for {4 - varied} images"


def test_all_off_is_resize_and_normalise():
    image = person()
    train = build_train_transform(128, 64, ALL_OFF)(image=image)["image"]
    evaluated = build_eval_transform(128, 64)(image=image)["image"]
    torch.testing.assert_close(train, evaluated)


def test_eval_transform_deterministic_and_normalised():
    transform = build_eval_transform(128, 64)
    image = person()
    first, second = transform(image=image)["image"], transform(image=image)["image"]
    assert first.shape == (3, 128, 64) and first.dtype == torch.float32
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    want = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - mean) / std
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert build_eval_transform(64, 32)(image=image)["image"].shape == (3, 64, 32)


@pytest.mark.parametrize("replace_p", [0.0, 0.5, 1.0])
def test_channel_exchange_permutes_or_replicates(replace_p):
    image = person(16, 8)
    transform = ChannelExchange(replace_p=replace_p, p=1.0)
    transform.set_random_seed(int(replace_p * 10))
    kinds = set()
    for _ in range(40):
        out = transform(image=image)["image"]
        assert out.shape == image.shape and out.dtype == image.dtype
        # which input channel each output channel is (channels of `person` are distinct)
        order = []
        for c in range(3):
            sources = [s for s in range(3) if np.array_equal(out[..., c], image[..., s])]
            assert len(sources) == 1
            order.append(sources[0])
        if len(set(order)) == 1:
            kinds.add("replicate")
        else:
            assert sorted(order) == [0, 1, 2]
            kinds.add("permute")
    assert kinds == {0.0: {"permute"}, 0.5: {"permute", "replicate"}, 1.0: {"replicate"}}[replace_p]


def test_random_shift_keeps_size_with_gray_border():
    image = (person() // 3).astype(np.uint8)  # values 0..85: never the 127 fill
    transform = RandomShift(p=1.0)
    transform.set_random_seed(5)
    for _ in range(10):
        out = transform(image=image)["image"]
        assert out.shape == image.shape and out.dtype == np.uint8
        pasted = (out != 127).any(axis=2)
        rows, cols = np.nonzero(pasted)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert pasted[top:bottom, left:right].all()  # one solid rectangle ...
        border = np.ones(pasted.shape, dtype=bool)
        border[top:bottom, left:right] = False
        assert (out[border] == 127).all() and border.any()  # ... on a gray canvas
        assert bottom - top < image.shape[0] and right - left < image.shape[1]


def test_random_patch_pastes_only_after_min_pool():
    min_pool = 5
    transform = RandomPatch(min_pool=min_pool, p=1.0)
    transform.set_random_seed(0)
    for n in range(min_pool - 1):
        image = person(seed=n)
        np.testing.assert_array_equal(transform(image=image)["image"], image)
    assert len(transform.pool) == min_pool - 1
    changed = 0
    for n in range(min_pool - 1, min_pool + 10):
        image = person(seed=n)
        out = transform(image=image)["image"]
        assert out.shape == image.shape
        changed += int(not np.array_equal(out, image))
    assert changed >= 8  # pastes from a pool of other images' patches

    never = RandomPatch(min_pool=1, p=0.0)
    image = person()
    np.testing.assert_array_equal(never(image=image)["image"], image)
    assert len(never.pool) == 1  # the pool still fills when nothing is pasted
