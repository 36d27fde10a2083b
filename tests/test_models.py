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
    ARCHS,
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
    [({"pooling": "minmax"}, "model.pooling='minmax'"),
     ({"head": "softmax"}, "model.head='softmax'")],
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


def start_python(code: str, **env_vars: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env_vars)
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
        "print('needed' if needed else 'not-needed')\n",
        REID_PLATFORM_NO_TORCHVISION_HOOK="1",  # the guard alone, without the venv's hook
    )
    # without the venv's import hook (see the next test), a plain import fails
    bare = start_python("import torchvision", REID_PLATFORM_NO_TORCHVISION_HOOK="1")
    guarded_out, guarded_err = guarded.communicate(timeout=120)
    _, bare_err = bare.communicate(timeout=120)
    assert guarded.returncode == 0, guarded_err
    if guarded_out.strip() == "not-needed":
        pytest.skip("torchvision's compiled ops load here: the guard is not needed")
    assert bare.returncode != 0
    assert "torchvision::nms" in bare_err


def test_plain_import_timm_works_through_the_pth_hook(tmp_path):
    """The `.pth` line written by `make install` makes a bare `import timm` work, and adds no
    torch import to interpreter start-up."""
    from reid_platform.torchvision_hook import PTH_NAME, write_pth

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert write_pth(site_dir) == site_dir / PTH_NAME
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r}); "
    env = {"REID_PLATFORM_NO_TORCHVISION_HOOK": "0"}
    startup = start_python(
        prelude + "print(sorted(m for m in ('torch', 'torchvision', 'reid_platform') "
        "if m in sys.modules)); print(any(type(f).__name__ == 'TorchvisionGuardFinder' "
        "for f in sys.meta_path))", **env)
    plain = start_python(prelude + "import timm; m = timm.create_model('test_resnet'); "
                         "print(type(m).__name__)", **env)
    out, err = startup.communicate(timeout=120)
    assert startup.returncode == 0, err
    assert out.split() == ["[]", "True"]  # nothing heavy imported, the finder is in place
    out, err = plain.communicate(timeout=180)
    assert plain.returncode == 0, err
    assert out.strip() == "ResNet"


def write_hub_cache(cache: Path, repo_id: str, state: dict) -> Path:
    """A Hugging Face hub cache entry, as `hf_hub_download` leaves it, holding `state`."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot / "model.safetensors"


def test_pretrained_timm_hub_offline_from_a_prepared_cache(tmp_path):
    import timm

    torch.manual_seed(7)
    source = timm.create_model("test_resnet", num_classes=1000)
    repo_id = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    write_hub_cache(tmp_path / "hub", repo_id, source.state_dict())
    want = tmp_path / "want.pt"
    torch.save(source.state_dict(), want)
    code = (
        "import torch\n"
        "from reid_platform.config import ModelConfig\n"
        "from reid_platform.models import ModelError, build_model\n"
        "model = build_model(ModelConfig(backbone='test_resnet', pretrained='timm', ibn='a'), 3)\n"
        f"want = torch.load({str(want)!r})\n"
        "got = model.backbone.state_dict()\n"
        "assert torch.equal(got['layer4.0.conv1.weight'], want['layer4.0.conv1.weight'])\n"
        "half = got['layer1.0.bn1.IN.weight'].numel()\n"
        "assert torch.equal(got['layer1.0.bn1.BN.running_var'],\n"
        "                   want['layer1.0.bn1.running_var'][half:])\n"
        "print('loaded')\n"
        "try:\n"
        "    build_model(ModelConfig(backbone='test_vit', pretrained='timm'), 3)\n"
        "except ModelError as err:\n"
        "    print(err)\n"
    )
    proc = start_python(code, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
                        HF_HOME=str(tmp_path / "hf"))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "loaded"
    assert ("model.pretrained=timm: the ImageNet weights of test_vit is not in timm's hub"
            in lines[1])
    assert "HF_HUB_OFFLINE=1" in lines[1] and "pretrained=True" in lines[1]


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


# ---- model families: every arch x backbone x pooling ----------------------------------------

FAMILY_BACKBONES = ["test_resnet", "test_vit"]
FAMILY_SIZE = (64, 32)


def family_config(arch: str, backbone: str, pooling: str, **kwargs) -> ModelConfig:
    """Small settings that every family can build on 64x32 images (test_vit: a 4x2 grid)."""
    settings = dict(arch=arch, backbone=backbone, pooling=pooling, netvlad_clusters=4,
                    part_dim=16, pcb_stripes=4 if backbone == "test_resnet" else 2,
                    parts=("1", "2", "2x2") if backbone == "test_resnet" else ("1", "2"))
    return ModelConfig(**{**settings, **kwargs})


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("backbone", FAMILY_BACKBONES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_family_contract(arch, backbone, pooling, tmp_path):
    torch.manual_seed(0)
    config = family_config(arch, backbone, pooling)
    model = build_model(config, NUM_CLASSES, input_size=FAMILY_SIZE)
    x = images()
    pids = torch.tensor([0, 1, 4, 1])
    out = model(x, pids)
    assert isinstance(out, ReidOutput) and len(out.branches) == len(model.branches)
    for spec, branch in zip(model.branches, out.branches):
        assert branch.features.shape == branch.bn_features.shape == (4, spec.dim)
        assert branch.logits.shape == (4, NUM_CLASSES)
        assert torch.isfinite(branch.features).all() and torch.isfinite(branch.logits).all()
    assert model.embedding_dim == sum(b.dim for b in model.branches)
    if arch != "bot":
        assert all(b.dim == 16 for b in model.branches)
    loss = sum(F.cross_entropy(b.logits, pids) for b in out.branches)
    loss = loss + sum(b.features.pow(2).mean() for b in out.branches)
    loss.backward()
    # every parameter that trains gets a gradient (DDP refuses unused ones)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
              and not n.endswith("bnneck.bias")]
    assert not unused, unused
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert backbone_ids and backbone_ids < {id(p) for p in model.parameters()}

    model.eval()
    with torch.no_grad():
        out_eval = model(x)
        emb = model.embed(x)
    assert isinstance(out_eval, ReidOutput) and len(out_eval.branches) == len(out.branches)
    assert emb.shape == (4, model.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb, out_eval.embedding())

    cfg = Config(name="family").replace(**{"data.height": 64, "data.width": 32})
    cfg = dataclasses.replace(cfg, model=config)
    directory = save_checkpoint(tmp_path / "ck", model, cfg, epoch=1)
    loaded, loaded_cfg = load_model(directory)
    assert loaded_cfg.model == config and type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), emb, rtol=0, atol=0)


def test_mgn_branches_strides_and_grid():
    """[1, 2, 3, 2x2]: 1 + 3 + 4 + 5 features; global branch at last_stride 2 has half the
    map of the part branches; a part feature is the max over its cell of the branch map."""
    torch.manual_seed(0)
    config = ModelConfig(arch="mgn", backbone="test_resnet", parts=("1", "2", "3", "2x2"),
                         part_dim=8, pooling="max", last_stride=2)
    model = build_model(config, NUM_CLASSES, input_size=(64, 32)).eval()
    names = [b.name for b in model.branches]
    assert names == ["b0_global", "b1_global", "b1_part0", "b1_part1", "b2_global",
                     "b2_part0", "b2_part1", "b2_part2", "b3_global", "b3_part0", "b3_part1",
                     "b3_part2", "b3_part3"]
    assert [b.name for b in model.branches if b.metric] == [
        "b0_global", "b1_global", "b2_global", "b3_global"]
    assert model.embedding_dim == 13 * 8
    x = images(2, 64, 64)
    with torch.no_grad():
        shared = model.shared(x)
        maps = [trunk(shared) for trunk in model.trunks]
        pooled = model.pooled(x)
    assert maps[0].shape[2:] == (2, 2)  # global branch: stride 2
    assert all(m.shape[2:] == (4, 4) for m in maps[1:])  # part branches: stride 1
    grid = maps[3]
    cells = [grid[:, :, :2, :2], grid[:, :, :2, 2:], grid[:, :, 2:, :2], grid[:, :, 2:, 2:]]
    for got, cell in zip(pooled[9:13], cells):
        torch.testing.assert_close(got, cell.amax(dim=(2, 3)))
    stripes = [maps[2][:, :, 0:2], maps[2][:, :, 2:3], maps[2][:, :, 3:4]]  # 4 rows into 3
    for got, stripe in zip(pooled[5:8], stripes):
        torch.testing.assert_close(got, stripe.amax(dim=(2, 3)))
    # the branches have their own layer4 (copies, not shared)
    assert model.trunks[0][1][0].conv1.weight is not model.trunks[1][1][0].conv1.weight


def test_mgn_bad_settings():
    with pytest.raises(ModelError, match=r"model.parts entry '2y2'"):
        build_model(ModelConfig(arch="mgn", backbone="test_resnet", parts=("1", "2y2")), 3)
    with pytest.raises(ModelError, match="cannot cut a 2x1 feature map into 3x1"):
        model = build_model(ModelConfig(arch="mgn", backbone="test_resnet", parts=("3",),
                                        last_stride=2), 3, input_size=(64, 32))
        model(images(2, 32, 16))
    with pytest.raises(ModelError, match="model.arch=mgn needs a ResNet-family"):
        build_model(ModelConfig(arch="mgn", backbone="test_efficientnet"), 3)


def test_check_model_fails_in_the_driver_without_memory():
    from reid_platform.models import check_model

    check_model(ModelConfig(arch="mgn", backbone="resnet50", ibn="a", non_local=(0, 2, 3, 0)),
                (384, 128))  # a 70M-parameter model on the meta device: instant, no memory
    with pytest.raises(ModelError, match=r"8x4 feature map into 12x1 parts \(model.parts"):
        check_model(ModelConfig(arch="pcb", backbone="resnet18", pcb_stripes=12), (128, 64))
    with pytest.raises(ModelError, match="model.ibn=a needs a timm ResNet-family"):
        check_model(ModelConfig(backbone="test_vit", ibn="a"), (64, 32))


def test_pcb_stripes_and_rpp_match_hand_pooling():
    torch.manual_seed(0)
    config = ModelConfig(arch="pcb", backbone="test_resnet", pcb_stripes=4, part_dim=8)
    model = build_model(config, NUM_CLASSES, input_size=(64, 32)).eval()
    assert [b.name for b in model.branches] == ["stripe0", "stripe1", "stripe2", "stripe3"]
    assert not any(b.metric for b in model.branches)
    x = images(2)
    with torch.no_grad():
        fmap = model.backbone.forward_features(x)  # (2, C, 4, 2) at last stride 1
        pooled = model.pooled(x)
    assert fmap.shape[2:] == (4, 2)
    for i, got in enumerate(pooled):
        torch.testing.assert_close(got, fmap[:, :, i].mean(dim=2))

    rpp = build_model(dataclasses.replace(config, pcb_rpp=True), NUM_CLASSES,
                      input_size=(64, 32)).eval()
    with torch.no_grad():
        fmap = rpp.backbone.forward_features(x)
        pooled = rpp.pooled(x)
        weight = rpp.rpp.classifier.weight[:, :, 0, 0]  # (parts, C)
    columns = fmap.flatten(2).transpose(1, 2).double()  # (2, N, C)
    for b in range(2):
        probs = [torch.softmax(weight.double() @ f, dim=0) for f in columns[b]]
        for i in range(4):
            want = sum(p[i] * f for p, f in zip(probs, columns[b])) / sum(p[i] for p in probs)
            torch.testing.assert_close(pooled[i][b].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="model.pcb_rpp .* needs model.pooling=avg"):
        build_model(dataclasses.replace(config, pcb_rpp=True, pooling="gem"), 3)


def test_pcb_trains_with_id_loss_only():
    from reid_platform.losses import ReidLoss

    model = build_model(ModelConfig(arch="pcb", backbone="test_resnet", pcb_stripes=2), 4,
                        input_size=(64, 32))
    loss = ReidLoss(Config().loss.__class__(center_weight=0.01), 4, model.branches)
    assert list(loss.terms) == ["id"]  # no metric branch: triplet and center left out


# ---- IBN, non-local ---------------------------------------------------------------------


def instance_norms_per_stage(backbone) -> list[int]:
    from reid_platform.models import resnet_stages

    return [sum(isinstance(m, torch.nn.InstanceNorm2d) for m in stage.modules())
            for stage in resnet_stages(backbone)]


@pytest.mark.parametrize("name,blocks", [("resnet18", [2, 2, 2, 2]),
                                          ("resnet50", [3, 4, 6, 3])])
def test_ibn_modules_are_where_they_belong(name, blocks):
    a = build_model(ModelConfig(backbone=name, ibn="a"), 3).backbone
    assert instance_norms_per_stage(a) == [0, blocks[0], blocks[1], blocks[2], 0]
    ibn = a.layer2[0].bn1
    assert (ibn.IN.num_features, ibn.BN.num_features) == (64, 64)  # half of 128
    b = build_model(ModelConfig(backbone=name, ibn="b"), 3).backbone
    assert instance_norms_per_stage(b) == [1, 1, 1, 0, 0]  # stem, last block of stages 1-2
    assert isinstance(b.bn1, torch.nn.InstanceNorm2d)
    last = b.layer1[-1]
    assert isinstance(getattr(last, "act3", getattr(last, "act2", None)).IN,
                      torch.nn.InstanceNorm2d)
    with pytest.raises(ModelError, match="model.ibn=a needs a timm ResNet-family"):
        build_model(ModelConfig(backbone="test_vit", ibn="a"), 3)


def test_ibn_keeps_local_imagenet_weights(tmp_path):
    import timm

    torch.manual_seed(5)
    source = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(backbone="test_resnet", ibn="a", pretrained=str(path)), 3)
    backbone, want = model.backbone, source.state_dict()
    torch.testing.assert_close(backbone.layer1[0].conv1.weight, want["layer1.0.conv1.weight"])
    ibn = backbone.layer1[0].bn1
    half = ibn.half
    torch.testing.assert_close(ibn.IN.weight, want["layer1.0.bn1.weight"][:half])
    torch.testing.assert_close(ibn.BN.running_var, want["layer1.0.bn1.running_var"][half:])
    torch.testing.assert_close(backbone.layer4[0].bn1.weight, want["layer4.0.bn1.weight"])

    # A file in IBN-Net's own layout (bn1.IN / bn1.BN) loads by name where shapes match.
    ibn_state = model.backbone.state_dict()
    ibn_state = {k: torch.full_like(v, 0.25) if k.endswith("IN.weight") else v
                 for k, v in ibn_state.items()}
    ibn_path = tmp_path / "ibn_a.pth"
    torch.save(ibn_state, ibn_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor of the file finds its place
        again = build_model(ModelConfig(backbone="test_resnet", ibn="a",
                                        pretrained=str(ibn_path)), 3)
    torch.testing.assert_close(again.backbone.layer2[0].bn1.IN.weight,
                               torch.full_like(again.backbone.layer2[0].bn1.IN.weight, 0.25))
    torch.testing.assert_close(again.backbone.layer2[0].bn1.BN.running_mean,
                               ibn_state["layer2.0.bn1.BN.running_mean"])
    # a tensor that fits nowhere is named in a warning, not silently dropped
    torch.save({**ibn_state, "layer9.weight": torch.ones(3)}, ibn_path)
    with pytest.warns(UserWarning, match=r"1 tensors of the file fit no tensor.*layer9"):
        build_model(ModelConfig(backbone="test_resnet", ibn="a", pretrained=str(ibn_path)), 3)


def test_non_local_blocks_inserted_and_identity_at_start():
    import copy

    from reid_platform.models import NonLocalBlock, insert_non_local

    torch.manual_seed(0)
    nl = build_model(ModelConfig(backbone="resnet18", non_local=(0, 1, 2, 0)), 3)
    counts = [sum(isinstance(m, NonLocalBlock) for m in getattr(nl.backbone, f"layer{i}")
                  .modules()) for i in range(1, 5)]
    assert counts == [0, 1, 2, 0]
    assert isinstance(nl.backbone.layer2[1][1], NonLocalBlock)  # after the last block
    assert isinstance(nl.backbone.layer3[0][1], NonLocalBlock)  # stage 3: after both blocks

    plain = build_model(ModelConfig(backbone="resnet18"), 3).backbone.eval()
    inserted = copy.deepcopy(plain)
    insert_non_local(inserted, (0, 1, 2, 0))
    x = images(2, 64, 32)
    with torch.no_grad():  # W's BatchNorm starts at zero: the blocks start as the identity
        torch.testing.assert_close(inserted.eval().forward_features(x),
                                   plain.forward_features(x), rtol=0, atol=0)
    block = NonLocalBlock(4)
    torch.nn.init.ones_(block.W[1].weight)
    y = torch.randn(2, 4, 3, 2)
    assert not torch.allclose(block.train()(y), y)
    with pytest.raises(ModelError, match=r"model.non_local\[1\]=3: stage 2 has 2 blocks"):
        build_model(ModelConfig(backbone="resnet18", non_local=(0, 3, 0, 0)), 3)
    with pytest.raises(ModelError, match="must list 4 counts"):
        build_model(ModelConfig(backbone="resnet18", non_local=(1, 1)), 3)


# ---- transformers at re-ID resolution -----------------------------------------------------


def test_vit_input_size_patch_stride_and_position_embeddings(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(6)
    source = timm.create_model("test_vit", num_classes=10, img_size=160, dynamic_img_size=False)
    assert source.pos_embed.shape[1] == 1 + 10 * 10
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)

    model = build_model(ModelConfig(backbone="test_vit", pretrained=str(path)), 3,
                        input_size=(64, 32))
    vit = model.backbone
    assert tuple(vit.patch_embed.grid_size) == (4, 2)
    want = resample_abs_pos_embed(source.pos_embed.data, new_size=[4, 2], num_prefix_tokens=1)
    torch.testing.assert_close(vit.pos_embed.data, want)
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)

    strided = build_model(ModelConfig(backbone="test_vit", pretrained=str(path),
                                      patch_stride=12, pooling="max"), 3, input_size=(64, 32))
    vit = strided.backbone
    assert vit.patch_embed.proj.stride == (12, 12)
    assert tuple(vit.patch_embed.grid_size) == (5, 2)  # (64-16)/12+1, (32-16)/12+1
    assert vit.pos_embed.shape[1] == 1 + 5 * 2
    with torch.no_grad():
        tokens = vit.forward_features(images(2))
    assert tokens.shape[1] == 1 + 5 * 2
    assert strided(images(2)).branches[0].features.shape == (2, vit.num_features)
    with pytest.raises(ModelError, match="model.patch_stride applies to ViT-style"):
        build_model(ModelConfig(backbone="test_resnet", patch_stride=8), 3)
    with pytest.raises(ModelError, match=r"model.patch_stride=20 must be in 1..16"):
        build_model(ModelConfig(backbone="test_vit", patch_stride=20), 3, input_size=(64, 32))


# ---- pooling -------------------------------------------------------------------------------


def test_max_pooling_and_netvlad_against_loops():
    from reid_platform.models import NetVLAD, build_pooling

    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(build_pooling("max", 3)(x), x.amax(dim=(2, 3)))
    torch.manual_seed(0)
    vlad = NetVLAD(3, clusters=4, out_dim=2).double()
    x = x.double()
    got = vlad.vlad(x)
    w, bias = vlad.assign.weight[:, :, 0, 0], vlad.assign.bias
    for b in range(2):
        desc = [F.normalize(x[b, :, i, j], dim=0) for i in range(4) for j in range(5)]
        rows = []
        for k in range(4):
            v = torch.zeros(3, dtype=torch.float64)
            for d in desc:
                a = torch.softmax(w @ d + bias, dim=0)[k]
                v = v + a * (d - vlad.centroids[k])
            rows.append(v / v.norm())
        want = torch.cat(rows)
        torch.testing.assert_close(got[b], want / want.norm())
    out = vlad(x)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_netvlad_pca_whitening_whitens():
    from reid_platform.models import NetVLAD

    torch.manual_seed(0)
    vlad = NetVLAD(4, clusters=2, out_dim=3).double()
    data = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    vlad.init_pca_whitening(data)
    projected = vlad.projection(data)
    torch.testing.assert_close(projected.mean(dim=0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(torch.cov(projected.T), torch.eye(3, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs more than 3 VLAD vectors"):
        vlad.init_pca_whitening(data[:3])


# ---- fast training paths ---------------------------------------------------------------


def write_images(directory: Path, count: int, corrupt: int | None = None) -> list:
    import cv2

    from reid_platform.data.formats import Sample

    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        path = directory / f"{i:03d}.jpg"
        cv2.imwrite(str(path), person(40 + 7 * i, 20 + 3 * i, seed=i))
        if i == corrupt:
            path.write_bytes(path.read_bytes()[:100])
        samples.append(Sample(path=str(path), pid=i % 3, camid=i % 2, split="train"))
    return samples


def test_ram_cache_gives_the_items_of_the_decoding_dataset(tmp_path):
    from reid_platform.data.cache import RamCachedDataset
    from reid_platform.data.dataset import ImageDataset

    samples = write_images(tmp_path / "images", 5, corrupt=3)
    transform = build_train_transform(32, 16, ALL_OFF)  # resize + normalise: deterministic
    plain = ImageDataset(samples, transform)
    cached = RamCachedDataset(samples, 32, 16, transform, threads=2)
    assert cached.images.shape == (5, 32, 16, 3) and cached.images.is_shared()
    assert cached.num_corrupt == 1
    for i in range(5):
        want, got = plain[i], cached[i]
        if i == 3:
            assert got[0] == "corrupt" and "003.jpg" in got[1]
            continue
        assert got["pid"] == want["pid"] and got["index"] == i
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
    # augmentation runs on the cached pixels, fresh each time
    flip = build_train_transform(32, 16, dataclasses.replace(ALL_OFF, flip_p=1.0))
    flipped = RamCachedDataset(samples[:1], 32, 16, flip)[0]["image"]
    torch.testing.assert_close(flipped, plain[0]["image"].flip(2))


def test_ram_cache_refuses_to_take_half_the_memory(tmp_path, monkeypatch):
    from reid_platform.data import cache

    samples = write_images(tmp_path / "images", 2)
    monkeypatch.setattr(cache, "_physical_memory", lambda: 4 * 32 * 16 * 3 - 1)
    with pytest.raises(cache.CacheError, match=r"data.cache=ram: 2 images at 32x16 need"):
        cache.RamCachedDataset(samples, 32, 16, build_train_transform(32, 16, ALL_OFF))


def test_channels_last_and_amp_settings():
    from reid_platform.runtime import amp_dtype, amp_enabled
    from reid_platform.training.fast import is_cnn, use_channels_last

    cnn = build_model(model_config("test_resnet"), 3)
    vit = build_model(model_config("test_vit"), 3)
    assert is_cnn(cnn) and not is_cnn(vit)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last("auto", cuda, cnn) and not use_channels_last("auto", cuda, vit)
    assert not use_channels_last("auto", cpu, cnn)
    assert use_channels_last("on", cpu, vit) and not use_channels_last("off", cuda, cnn)
    assert amp_dtype("bf16") == torch.bfloat16 and amp_dtype("on") == torch.float16
    assert amp_enabled("bf16", cpu) and amp_enabled("fp16", cpu) and not amp_enabled("auto", cpu)
    assert amp_enabled("auto", cuda) and not amp_enabled("off", cuda)
    # bf16 autocast and channels-last on CPU give the fp32 result up to bf16 precision
    model = cnn.eval()
    x = images(2)
    with torch.no_grad():
        want = model.embed(x)
        last = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = last.embed(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", ["bot", "mgn"])
def test_compiled_forward_equals_eager(arch):
    """Dynamo traces the models (their ReidOutput included); the eager backend keeps the test
    free of a C++ toolchain and fast."""
    from reid_platform.training.fast import CompiledForward

    torch.manual_seed(0)
    model = build_model(family_config(arch, "test_resnet", "avg"), NUM_CLASSES,
                        input_size=FAMILY_SIZE).eval()
    compiled = CompiledForward(model, backend="eager")
    x = images()
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert compiled.ok is True
    for a, b in zip(got.branches, want.branches):
        torch.testing.assert_close(a.bn_features, b.bn_features)


def test_compile_falls_back_with_a_warning(monkeypatch):
    from reid_platform.training.fast import CompiledForward

    def failing(*args, **kwargs):
        raise RuntimeError("no backend for this platform")

    module = torch.nn.Linear(2, 2)
    calls = {"n": 0}

    def compiled_then_broken(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("inductor: cannot compile")
        raise ValueError("a real error")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled_then_broken)
    forward = CompiledForward(module)
    x = torch.ones(1, 2)
    with pytest.warns(UserWarning, match="train.compile: torch.compile is unavailable.*inductor"):
        torch.testing.assert_close(forward(x), module(x))
    assert forward.ok is False
    torch.testing.assert_close(forward(x), module(x))  # eager from now on, no new warning
    monkeypatch.setattr(torch, "compile", failing)
    with pytest.warns(UserWarning, match="no backend for this platform"):
        CompiledForward(module)
    ok = CompiledForward.__new__(CompiledForward)
    ok.module, ok.ok, ok.compiled = module, True, compiled_then_broken
    calls["n"] = 1
    with pytest.raises(ValueError, match="a real error"):  # after a success: not swallowed
        ok(x)
