"""Losses against plain-Python loops: batch-hard triplet, label-smoothed CE, center loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reid_platform.config import LossConfig
from reid_platform.losses import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    LossTerm,
    ReidLoss,
    TripletLoss,
    cosine_dist,
    euclidean_dist,
)
from reid_platform.models import BranchOutput, BranchSpec, ReidOutput


def one_branch(features: torch.Tensor, logits: torch.Tensor) -> ReidOutput:
    """A BoT-like output: one branch whose post-BNNeck features are not used by losses."""
    return ReidOutput([BranchOutput(features, features.detach(), logits)])

# ---- references --------------------------------------------------------------------------


def ref_distance(a: list[float], b: list[float], distance: str) -> float:
    if distance == "euclidean":
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    dot = sum(x * y for x, y in zip(a, b))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    return 1.0 - dot / (norm_a * norm_b)


def ref_triplet(features, pids, margin: float, soft_margin: bool, distance: str) -> float:
    """One anchor at a time: farthest positive (itself included), closest negative."""
    rows = features.double().tolist()
    labels = pids.tolist()
    losses = []
    for i, anchor in enumerate(rows):
        pos = [ref_distance(anchor, r, distance) for r, p in zip(rows, labels) if p == labels[i]]
        neg = [ref_distance(anchor, r, distance) for r, p in zip(rows, labels) if p != labels[i]]
        if not neg:
            continue
        diff = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(diff)) if soft_margin else max(0.0, diff + margin))
    return sum(losses) / len(losses) if losses else 0.0


def torch_loop_triplet(features, pids, margin: float) -> torch.Tensor:
    """Differentiable per-anchor loop (Euclidean hinge), for comparing gradients."""
    losses = []
    for i in range(len(pids)):
        dists = torch.stack([torch.linalg.norm(features[i] - f) for f in features])
        same = pids == pids[i]
        d_ap = dists[same & (torch.arange(len(pids)) != i)].max()
        d_an = dists[~same].min()
        losses.append(F.relu(d_ap - d_an + margin))
    return torch.stack(losses).mean()


def pk_pids(num_ids: int, num_instances: int, generator: torch.Generator) -> torch.Tensor:
    pids = torch.arange(num_ids).repeat_interleave(num_instances)
    return pids[torch.randperm(len(pids), generator=generator)]


# ---- triplet -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_matches_loop(dtype, distance, soft_margin, seed):
    gen = torch.Generator().manual_seed(seed)
    pids = pk_pids(4, 3, gen)  # every anchor has positives and negatives
    features = torch.randn(len(pids), 8, generator=gen, dtype=dtype)
    margin = 0.3 if seed == 0 else 1.5
    loss = TripletLoss(margin, soft_margin, distance)(features, pids)
    assert loss.dtype == dtype and loss.ndim == 0
    want = ref_triplet(features, pids, margin, soft_margin, distance)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert loss.item() == pytest.approx(want, rel=tol, abs=tol)


def test_triplet_gradient_matches_loop():
    gen = torch.Generator().manual_seed(3)
    pids = pk_pids(4, 3, gen)
    features = torch.randn(len(pids), 6, generator=gen, dtype=torch.float64)
    x1 = features.clone().requires_grad_(True)
    x2 = features.clone().requires_grad_(True)
    TripletLoss(margin=1.0)(x1, pids).backward()
    torch_loop_triplet(x2, pids, margin=1.0).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_one_identity_is_zero_with_finite_gradient(distance, soft_margin):
    features = torch.randn(6, 8, requires_grad=True)
    loss = TripletLoss(0.3, soft_margin, distance)(features, torch.full((6,), 7))
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_all_equal_features(distance, soft_margin):
    features = torch.ones(8, 5, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = TripletLoss(0.3, soft_margin, distance)(features, pids)
    # every distance is (numerically) 0: hinge = margin, soft margin = log 2
    want = math.log(2.0) if soft_margin else 0.3
    assert loss.item() == pytest.approx(want, abs=1e-3)
    loss.backward()
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_anchor_alone_with_its_identity(distance, soft_margin):
    # ids 5 and 9 have one image each: their hardest positive is themselves (distance 0)
    gen = torch.Generator().manual_seed(4)
    pids = torch.tensor([0, 0, 1, 1, 5, 2, 2, 9])
    features = torch.randn(len(pids), 8, generator=gen, dtype=torch.float64)
    features.requires_grad_(True)
    loss = TripletLoss(2.0, soft_margin, distance)(features, pids)
    want = ref_triplet(features.detach(), pids, 2.0, soft_margin, distance)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_triplet_unknown_distance():
    with pytest.raises(ValueError, match="manhattan"):
        TripletLoss(distance="manhattan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distances_match_loop(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=gen, dtype=dtype)
    y = torch.randn(4, 7, generator=gen, dtype=dtype)
    for name, fn in [("euclidean", euclidean_dist), ("cosine", cosine_dist)]:
        got = fn(x, y)
        assert got.shape == (5, 4) and got.dtype == dtype
        want = [
            [ref_distance(a, b, name) for b in y.double().tolist()] for a in x.double().tolist()
        ]
        torch.testing.assert_close(
            got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5
        )


# ---- label-smoothed cross-entropy ---------------------------------------------------------


def ref_label_smooth(logits, pids, eps: float) -> float:
    total = 0.0
    num_classes = logits.shape[1]
    for row, pid in zip(logits.double().tolist(), pids.tolist()):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        for c, v in enumerate(row):
            q = (1.0 - eps) * (c == pid) + eps / num_classes
            total -= q * (v - log_z)
    return total / len(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smooth_matches_loop_and_torch(dtype, eps):
    gen = torch.Generator().manual_seed(int(eps * 10))
    logits = torch.randn(9, 6, generator=gen, dtype=dtype) * 4
    pids = torch.randint(0, 6, (9,), generator=gen)
    loss = CrossEntropyLabelSmooth(eps)(logits, pids)
    assert loss.item() == pytest.approx(ref_label_smooth(logits, pids, eps), rel=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, pids, label_smoothing=eps))


def test_label_smooth_hand_computed():
    # two classes, logits (0, 0): log p = log 0.5 for both, so the loss is log 2 for any eps
    loss = CrossEntropyLabelSmooth(0.1)(torch.zeros(1, 2), torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(2.0))
    # logits (log 3, 0): p = (0.75, 0.25); target 0, eps 0.2 -> q = (0.9, 0.1)
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    loss = CrossEntropyLabelSmooth(0.2)(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(-(0.9 * math.log(0.75) + 0.1 * math.log(0.25)))


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smooth_rejects_bad_epsilon(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLabelSmooth(eps)


# ---- center loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_center_loss_matches_loop(dtype):
    gen = torch.Generator().manual_seed(6)
    loss_fn = CenterLoss(num_classes=5, feat_dim=4).to(dtype)
    features = torch.randn(10, 4, generator=gen, dtype=dtype)
    pids = torch.randint(0, 5, (10,), generator=gen)
    centers = loss_fn.centers.detach().double().tolist()
    want = sum(
        sum((f - c) ** 2 for f, c in zip(row, centers[p]))
        for row, p in zip(features.double().tolist(), pids.tolist())
    ) / len(pids)
    loss = loss_fn(features, pids)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert loss_fn.centers.grad is not None
    # only the centres of identities in the batch move
    untouched = sorted(set(range(5)) - set(pids.tolist()))
    assert torch.all(loss_fn.centers.grad[untouched] == 0)


def test_center_loss_zero_at_centres():
    loss_fn = CenterLoss(num_classes=3, feat_dim=4)
    pids = torch.tensor([2, 0, 2])
    features = loss_fn.centers.detach()[pids]
    assert loss_fn(features, pids).item() == pytest.approx(0.0, abs=1e-10)


# ---- weighted total -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "id_w,tri_w,center_w", [(1.0, 1.0, 0.0), (0.1, 0.9, 0.0), (1.0, 1.0, 0.0005), (0.3, 2.0, 0.5)]
)
def test_reid_loss_weights(id_w, tri_w, center_w):
    config = LossConfig(
        id_weight=id_w,
        triplet_weight=tri_w,
        center_weight=center_w,
        margin=0.5,
        label_smoothing=0.1,
    )
    gen = torch.Generator().manual_seed(7)
    pids = pk_pids(3, 2, gen)
    features = torch.randn(6, 8, generator=gen)
    logits = torch.randn(6, 3, generator=gen)
    loss_fn = ReidLoss(config, num_classes=3, branches=[BranchSpec("global", 8)])
    out = loss_fn(one_branch(features, logits), {"pid": pids})

    expected_keys = {"id", "triplet"} | ({"center"} if center_w > 0 else set())
    assert set(out.terms) == expected_keys
    assert ("center" in loss_fn.terms) == (center_w > 0)
    torch.testing.assert_close(out.terms["id"], CrossEntropyLabelSmooth(0.1)(logits, pids))
    torch.testing.assert_close(out.terms["triplet"], TripletLoss(0.5)(features, pids))
    want = id_w * out.terms["id"] + tri_w * out.terms["triplet"]
    if center_w > 0:
        center = loss_fn.terms["center"].centers[0]
        torch.testing.assert_close(out.terms["center"], center(features, pids))
        want = want + center_w * out.terms["center"]
    torch.testing.assert_close(out.total, want)


def test_reid_loss_half_precision_inputs_give_float32_terms():
    config = LossConfig(center_weight=0.1)
    gen = torch.Generator().manual_seed(8)
    pids = pk_pids(3, 2, gen)
    features = torch.randn(6, 8, generator=gen).half().requires_grad_(True)
    logits = torch.randn(6, 3, generator=gen).half()
    out = ReidLoss(config, num_classes=3, branches=[BranchSpec("global", 8)])(
        one_branch(features, logits), {"pid": pids}
    )
    assert all(t.dtype == torch.float32 for t in out.terms.values())
    out.total.backward()
    assert torch.isfinite(features.grad.float()).all()


# ---- several branches, terms that own parameters ------------------------------------------


def test_losses_sum_over_branches_and_metric_losses_skip_non_metric_branches():
    """ID loss on every branch's logits; triplet and center only on metric branches."""
    gen = torch.Generator().manual_seed(9)
    pids = pk_pids(3, 2, gen)
    branches = [BranchSpec("global", 8), BranchSpec("part1", 4, metric=False),
                BranchSpec("global2", 6)]
    feats = [torch.randn(6, b.dim, generator=gen) for b in branches]
    logits = [torch.randn(6, 3, generator=gen) for _ in branches]
    output = ReidOutput([BranchOutput(f, f, lg) for f, lg in zip(feats, logits)])
    config = LossConfig(id_weight=0.5, triplet_weight=2.0, center_weight=0.1, margin=0.3)
    loss_fn = ReidLoss(config, num_classes=3, branches=branches)
    out = loss_fn(output, {"pid": pids})

    ce, tri = CrossEntropyLabelSmooth(0.1), TripletLoss(0.3)
    want_id = sum(ce(lg, pids) for lg in logits)
    want_tri = tri(feats[0], pids) + tri(feats[2], pids)
    centers = loss_fn.terms["center"].centers
    assert [c.centers.shape for c in centers] == [(3, 8), (3, 6)]  # one table per metric branch
    want_center = centers[0](feats[0], pids) + centers[1](feats[2], pids)
    torch.testing.assert_close(out.terms["id"], want_id)
    torch.testing.assert_close(out.terms["triplet"], want_tri)
    torch.testing.assert_close(out.terms["center"], want_center)
    torch.testing.assert_close(out.total, 0.5 * want_id + 2.0 * want_tri + 0.1 * want_center)


def test_center_step_undoes_weight_and_amp_scale_and_skips_non_finite():
    """The centres move by lr * d(center loss)/d(centre), whatever the weight and AMP scale."""
    torch.manual_seed(0)
    weight, lr, scale = 0.0005, 0.5, 1024.0
    config = LossConfig(id_weight=1.0, triplet_weight=0.0, center_weight=weight, center_lr=lr)
    branches = [BranchSpec("global", 4)]
    loss_fn = ReidLoss(config, num_classes=3, branches=branches)
    center = loss_fn.terms["center"].centers[0]
    feats = torch.randn(4, 4)
    pids = torch.tensor([0, 0, 2, 2])
    output = ReidOutput([BranchOutput(feats, feats, torch.randn(4, 3))])
    before = center.centers.detach().clone()
    want_grad = torch.autograd.grad(center(feats, pids), center.centers)[0]

    loss_fn.zero_grad()
    (loss_fn(output, {"pid": pids}).total * scale).backward()  # what GradScaler does
    loss_fn.sync_gradients(world_size=1)
    loss_fn.step(grad_scale=scale)
    torch.testing.assert_close(center.centers.detach(), before - lr * want_grad)

    after = center.centers.detach().clone()
    center.centers.grad = torch.full_like(after, float("inf"))  # AMP overflow: no step
    loss_fn.step(grad_scale=scale)
    torch.testing.assert_close(center.centers.detach(), after)


def test_training_state_round_trip_restores_centres_and_their_optimizer():
    config = LossConfig(center_weight=0.1)
    branches = [BranchSpec("global", 4)]
    source = ReidLoss(config, num_classes=3, branches=branches)
    target = ReidLoss(config, num_classes=3, branches=branches)
    source.optimizers["center"].param_groups[0]["lr"] = 0.123
    target.load_training_state(source.training_state())
    torch.testing.assert_close(target.terms["center"].centers[0].centers,
                               source.terms["center"].centers[0].centers)
    assert target.optimizers["center"].param_groups[0]["lr"] == 0.123
    target.load_training_state({})  # a checkpoint without loss state changes nothing
    torch.testing.assert_close(target.terms["center"].centers[0].centers,
                               source.terms["center"].centers[0].centers)


class ScaledIdentityTerm(LossTerm):
    """A term with a learnable parameter and no own optimizer: it trains with the model."""

    name = "scaled"

    def __init__(self, weight: float):
        super().__init__(weight)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, output, batch):
        return self.scale * output.branches[0].features.pow(2).mean()


def test_a_new_term_needs_no_loop_code():
    """Explicit terms compose with the configured total; parameters without an own optimizer
    are handed to the model's optimizer, and every term gets its own name in the logs."""
    term = ScaledIdentityTerm(weight=0.5)
    loss_fn = ReidLoss(LossConfig(), num_classes=3, branches=[BranchSpec("g", 4)], terms=[term])
    assert loss_fn.model_parameters() == [term.scale] and loss_fn.optimizers == {}
    feats = torch.ones(2, 4)
    out = loss_fn(ReidOutput([BranchOutput(feats, feats, torch.zeros(2, 3))]), {"pid": None})
    assert set(out.terms) == {"scaled"}
    torch.testing.assert_close(out.total, torch.tensor(0.5 * 2.0))
    with pytest.raises(ValueError, match="distinct names"):
        ReidLoss(LossConfig(), 3, [BranchSpec("g", 4)], terms=[term, ScaledIdentityTerm(1.0)])
    with pytest.raises(ValueError, match="every loss weight is 0"):
        ReidLoss(LossConfig(id_weight=0.0, triplet_weight=0.0), 3, [BranchSpec("g", 4)])


# ---- the metric-learning zoo (loss.extra, pytorch-metric-learning) ------------------------


def ref_pairs(features: torch.Tensor, pids: torch.Tensor):
    """Plain-Python lists: unit features, and per anchor its positives and negatives."""
    rows = [[float(v) for v in row] for row in features.double()]
    unit = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]
    labels = [int(p) for p in pids]
    n = len(rows)
    pos = [[j for j in range(n) if j != i and labels[j] == labels[i]] for i in range(n)]
    neg = [[j for j in range(n) if labels[j] != labels[i]] for i in range(n)]
    return unit, pos, neg


def ref_cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def ref_contrastive(features, pids, pos_margin: float, neg_margin: float) -> float:
    """Mean over non-zero positive pair losses + mean over non-zero negative pair losses,
    on L2-normalised features (Euclidean distance)."""
    unit, pos, neg = ref_pairs(features, pids)

    def dist(i, j):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(unit[i], unit[j])))

    pos_l = [max(0.0, dist(i, j) - pos_margin) for i in range(len(unit)) for j in pos[i]]
    neg_l = [max(0.0, neg_margin - dist(i, j)) for i in range(len(unit)) for j in neg[i]]

    def mean_nonzero(values):
        nonzero = [v for v in values if v > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0

    return mean_nonzero(pos_l) + mean_nonzero(neg_l)


def ref_circle(features, pids, m: float, gamma: float) -> float:
    """Circle loss (Sun et al. 2020, eq. 6) per anchor with positives and negatives, mean."""
    unit, pos, neg = ref_pairs(features, pids)
    losses = []
    for i in range(len(unit)):
        if not pos[i] or not neg[i]:
            continue
        sp = [ref_cos(unit[i], unit[j]) for j in pos[i]]
        sn = [ref_cos(unit[i], unit[j]) for j in neg[i]]
        pos_sum = sum(math.exp(-gamma * max(0.0, 1 + m - s) * (s - (1 - m))) for s in sp)
        neg_sum = sum(math.exp(gamma * max(0.0, s + m) * (s - m)) for s in sn)
        losses.append(math.log(1.0 + pos_sum * neg_sum))
    return sum(losses) / len(losses)


def ref_multi_similarity(features, pids, alpha: float, beta: float, base: float) -> float:
    """Multi-similarity loss (Wang et al. 2019, eq. 7) over all pairs, mean over anchors."""
    unit, pos, neg = ref_pairs(features, pids)
    total = 0.0
    for i in range(len(unit)):
        sp = [ref_cos(unit[i], unit[j]) for j in pos[i]]
        sn = [ref_cos(unit[i], unit[j]) for j in neg[i]]
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in sp)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in sn)) / beta
    return total / len(unit)


def extra_term(**spec):
    from reid_platform.config import ExtraLoss
    from reid_platform.losses import MetricLearningTerm

    return MetricLearningTerm(ExtraLoss(**spec), [BranchSpec("global", 6)])


def batch_of(seed: int, num_ids: int = 4, k: int = 3, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    pids = pk_pids(num_ids, k, g)
    return torch.randn(len(pids), dim, generator=g, dtype=torch.float64), pids


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_circle_multi_similarity_match_the_papers(seed):
    features, pids = batch_of(seed)
    out = one_branch(features, features)
    batch = {"pid": pids}
    got = extra_term(name="contrastive", pos_margin=0.1, neg_margin=0.8)(out, batch)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_contrastive(features, pids, 0.1, 0.8), rel=1e-5)
    got = extra_term(name="circle", margin=0.25, scale=16.0)(out, batch)
    assert got.item() == pytest.approx(ref_circle(features, pids, 0.25, 16.0), rel=1e-5)
    got = extra_term(name="multi_similarity", alpha=2.0, beta=10.0, base=0.5,
                     miner_epsilon=0.0)(out, batch)
    assert got.item() == pytest.approx(ref_multi_similarity(features, pids, 2.0, 10.0, 0.5),
                                       rel=1e-5)


def test_metric_learning_terms_sum_over_metric_branches_only():
    from reid_platform.config import ExtraLoss
    from reid_platform.losses import MetricLearningTerm

    features, pids = batch_of(3)
    other = features.flip(0)
    out = ReidOutput([BranchOutput(features, features, None),
                      BranchOutput(other, other, None),
                      BranchOutput(features * 0, features * 0, None)])
    branches = [BranchSpec("g", 6), BranchSpec("g2", 6), BranchSpec("part", 6, metric=False)]
    term = MetricLearningTerm(ExtraLoss(name="circle", scale=16.0), branches)
    want = ref_circle(features, pids, 0.25, 16.0) + ref_circle(other, pids, 0.25, 16.0)
    assert term(out, {"pid": pids}).item() == pytest.approx(want, rel=1e-5)


def test_xbm_mines_against_the_memory_and_resumes(tmp_path):
    """Cross-batch memory: the second batch is contrasted with the first batch's (detached)
    embeddings too; the memory and its write position survive a training-state round trip."""
    first, pids1 = batch_of(4)
    second, pids2 = batch_of(5)
    pids2 = pids2 + 2  # two identities shared with the first batch, two new ones
    config = LossConfig(id_weight=0.0, triplet_weight=0.0, extra=(
        _extra(name="xbm", inner="contrastive", memory_size=64, pos_margin=0.0,
               neg_margin=0.9),))
    branches = [BranchSpec("global", 6)]
    loss = ReidLoss(config, 5, branches)
    assert list(loss.terms) == ["xbm"]
    loss(one_branch(first, first), {"pid": pids1})
    got = loss(one_branch(second, second), {"pid": pids2}).terms["xbm"]
    # reference: contrastive pairs of batch-2 anchors against memory = batch 1 + batch 2
    memory = torch.cat([first, second])
    mem_pids = torch.cat([pids1, pids2])
    unit = F.normalize(memory, dim=1)
    pos_l, neg_l = [], []
    offset = len(first)
    for i in range(len(second)):
        for j in range(len(memory)):
            if j == offset + i:
                continue
            d = (unit[offset + i] - unit[j]).norm().item()
            if mem_pids[j] == pids2[i]:
                pos_l.append(max(0.0, d))
            else:
                neg_l.append(max(0.0, 0.9 - d))
    want = sum(v for v in pos_l if v > 0) / sum(v > 0 for v in pos_l) + sum(
        v for v in neg_l if v > 0) / sum(v > 0 for v in neg_l)
    assert got.item() == pytest.approx(want, rel=1e-5)

    path = tmp_path / "state.pt"
    torch.save(loss.training_state(), path)
    restored = ReidLoss(config, 5, branches)
    restored.load_training_state(torch.load(path, weights_only=True))
    (a,), (b,) = loss.terms["xbm"].losses, restored.terms["xbm"].losses
    assert (b.queue_idx, b.has_been_filled) == (a.queue_idx, a.has_been_filled) == (24, False)
    torch.testing.assert_close(b.embedding_memory, a.embedding_memory)
    third, pids3 = batch_of(6)
    torch.testing.assert_close(restored(one_branch(third, third), {"pid": pids3}).terms["xbm"],
                               loss(one_branch(third, third), {"pid": pids3}).terms["xbm"])


def _extra(**spec):
    from reid_platform.config import ExtraLoss

    return ExtraLoss(**spec)


def test_extra_losses_from_config_and_errors():
    from reid_platform.config import Config, ConfigError, load_config

    config = load_config(None, ["loss.extra=[{name: circle, weight: 0.5}, {name: xbm}]"])
    loss = ReidLoss(config.loss, 5, [BranchSpec("global", 6)])
    assert list(loss.terms) == ["id", "triplet", "circle", "xbm"]
    assert loss.terms["circle"].weight == 0.5
    # a sweep (or --set) addresses an entry by its name
    swept = config.replace(**{"loss.extra.circle.weight": 0.25,
                              "loss.extra.multi_similarity.weight": 2.0})
    assert [(e.name, e.weight) for e in swept.loss.extra] == [
        ("circle", 0.25), ("xbm", 1.0), ("multi_similarity", 2.0)]
    assert Config.from_dict(swept.to_dict()) == swept
    with pytest.raises(ConfigError, match=r"loss.extra\[0\].name='arc' is not allowed"):
        load_config(None, ["loss.extra=[{name: arc}]"])
    with pytest.raises(ConfigError, match=r"loss.extra\[0\].name is required"):
        load_config(None, ["loss.extra=[{weight: 1.0}]"])
    with pytest.raises(ValueError, match="distinct names"):
        ReidLoss(load_config(None, ["loss.extra=[{name: circle}, {name: circle}]"]).loss, 5,
                 [BranchSpec("global", 6)])
    small = ReidLoss(LossConfig(extra=(_extra(name="xbm", memory_size=8),)), 5,
                     [BranchSpec("global", 6)])
    features, pids = batch_of(0)
    with pytest.raises(ValueError, match=r"memory_size=8 must hold at least one batch"):
        small(one_branch(features, features.float()), {"pid": pids})


def _ddp_worker(rank: int, world: int, init_file: str, features: torch.Tensor,
                pids: torch.Tensor, results) -> None:
    """One rank: its half of the batch through every zoo loss; loss and gradient back."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        size = len(pids) // world
        mine = slice(rank * size, (rank + 1) * size)
        out = {}
        for name, spec in ZOO.items():
            term = extra_term(**spec)
            for _step in range(2):  # XBM: the second step also sees the first's memory
                local = features[mine].clone().requires_grad_(True)
                value = term(one_branch(local, local), {"pid": pids[mine]})
                value.backward()
            # numpy pickles by value: a tensor would be shared through a file descriptor that
            # dies with this process
            out[name] = (float(value), local.grad.numpy().copy())
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


ZOO = {
    "contrastive": dict(name="contrastive", pos_margin=0.1, neg_margin=0.8),
    "circle": dict(name="circle", scale=16.0),
    "multi_similarity": dict(name="multi_similarity", beta=10.0, miner_epsilon=0.1),
    "xbm": dict(name="xbm", inner="multi_similarity", memory_size=64, beta=10.0),
}


def test_zoo_under_ddp_gathers_before_mining(tmp_path):
    """Two gloo ranks with half a batch each: every rank's loss is world_size times the
    single-process loss of the whole batch (mined over it), and its gradient world_size times
    the gradient of its own half, so DDP's averaging gives the single-process gradient."""
    import torch.multiprocessing as mp

    features, pids = batch_of(7, num_ids=4, k=4)
    features = features.float()
    order = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])  # ranks share ids
    features, pids = features[order], pids[order]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    procs = [context.Process(target=_ddp_worker,
                             args=(r, 2, str(tmp_path / "init"), features, pids, results))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get() for _ in procs)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for name, spec in ZOO.items():
        term = extra_term(**spec)
        for _ in range(2):
            full = features.clone().requires_grad_(True)
            value = term(one_branch(full, full), {"pid": pids})
            value.backward()
        for rank in range(2):
            loss_r, grad_r = got[rank][name]
            assert loss_r / 2 == pytest.approx(value.item(), rel=1e-4), name
            torch.testing.assert_close(torch.from_numpy(grad_r) / 2,
                                       full.grad[rank * 8:(rank + 1) * 8],
                                       rtol=1e-4, atol=1e-6)
