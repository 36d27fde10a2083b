"""Pseudo-labelling: sparse distance graphs, the three clustering methods, outliers, scoring,
unlabelled inputs, outputs that never overwrite, and the manifests training reads."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from reid_platform.data.extra import merge_extra_train
from reid_platform.data.formats import DatasetError, Sample, balance, load_csv
from reid_platform.evaluation.rerank import rerank_features
from reid_platform.pseudo.clustering import (
    ClusteringError,
    auto_eps,
    cluster_features,
    nearest_under_threshold,
    relabel_by_size,
    score_clustering,
    threshold_link,
)
from reid_platform.pseudo.distances import DistanceError, cosine_graph, jaccard_graph
from reid_platform.pseudo.labels import (
    Embedded,
    check_out_dir,
    unlabelled_samples,
    write_outputs,
    write_pseudo_csv,
)


def blobs(num_groups: int = 30, dim: int = 32, sizes=(6, 11), noise: float = 0.05,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable groups on the unit sphere: (N, dim) float32 features, (N,) group ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pids = np.repeat(np.arange(num_groups), rng.integers(sizes[0], sizes[1], num_groups))
    feats = centres[pids] + noise * rng.normal(size=(len(pids), dim))
    return feats.astype(np.float32), pids


def dense(graph: sp.csr_matrix, missing: float = np.inf) -> np.ndarray:
    out = np.full(graph.shape, missing, dtype=np.float64)
    coo = graph.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


def graph_of(matrix: np.ndarray) -> sp.csr_matrix:
    """A hand-made symmetric distance matrix as a graph (np.inf = pair not stored)."""
    rows, cols = np.nonzero(np.isfinite(matrix) & ~np.eye(len(matrix), dtype=bool))
    return sp.csr_matrix((matrix[rows, cols], (rows, cols)), shape=matrix.shape)


# ---- distances ----------------------------------------------------------------------------


def test_jaccard_graph_equals_the_evaluation_rerank_on_small_n():
    # groups larger than k1 (their pairs are not all among the nearest neighbours), overlapping
    feats, _ = blobs(num_groups=20, sizes=(8, 25), noise=0.3, seed=1)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    n = 150  # the same points as query (first n) and gallery (the rest) of the re-ranking
    graph = jaccard_graph(feats, k1=20, k2=6)
    reference = rerank_features(feats[:n], feats[n:], k1=20, k2=6, lambda_value=0.0)
    coo = graph.tocoo()
    cross = (coo.row < n) & (coo.col >= n)
    assert cross.sum() > 1000
    np.testing.assert_allclose(coo.data[cross], reference[coo.row[cross], coo.col[cross] - n],
                               atol=1e-5)
    # symmetric, no diagonal, in [0, 1]; every small distance is kept (a pair left out shares
    # little of its k-reciprocal encodings)
    assert abs(graph - graph.T).max() == 0 and graph.diagonal().max() == 0
    assert coo.data.min() >= 0 and coo.data.max() <= 1
    unstored = np.isinf(dense(graph))[:n, n:]
    assert (reference < 0.65).sum() > 100 and reference[unstored].min() > 0.65


def test_cosine_graph_holds_each_images_nearest_neighbours():
    feats, _ = blobs(num_groups=10, seed=2)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    graph = cosine_graph(feats, knn=5)
    full = 1.0 - unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(full, np.inf)
    stored = dense(graph)
    for i in range(len(feats)):
        nearest = np.argsort(full[i], kind="stable")[:5]
        np.testing.assert_allclose(stored[i, nearest], full[i, nearest], atol=1e-6)
    assert np.isfinite(stored).sum(axis=1).min() >= 5


def test_distance_input_errors():
    with pytest.raises(DistanceError, match="must be finite"):
        cosine_graph(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(DistanceError, match=r"1 feature row\(s\) are all zero"):
        jaccard_graph(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(DistanceError, match="k1 must be an integer >= 1"):
        jaccard_graph(np.eye(4), k1=0)


# ---- the methods --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [
        ("dbscan", {"distance": "jaccard"}),
        ("dbscan", {"distance": "cosine"}),
        ("kmeans", {"clusters": 30}),
        ("link", {"distance": "jaccard", "k1": 5, "k2": 2}),
        ("link", {"distance": "cosine", "threshold": 0.3}),
    ],
)
def test_each_method_recovers_separable_groups(method, options):
    # link gives every image the id of its nearest neighbour: a group of 2-3 images is always
    # one component of those links; larger groups may split into several (measured in the
    # README), so link is scored on small groups, with a k-reciprocal neighbourhood (k1) of
    # their size: with k1 far above the group size the Jaccard distance compares neighbourhoods
    # made mostly of other groups.
    sizes = (2, 4) if method == "link" else (6, 11)
    feats, pids = blobs(num_groups=30, sizes=sizes, seed=3)
    result = cluster_features(feats, method, **options)
    scores = score_clustering(result.labels, pids)
    assert scores["ari"] > 0.95 and scores["nmi"] > 0.97 and scores["purity"] > 0.95
    assert result.num_outliers <= len(pids) // 20
    assert abs(result.num_clusters - 30) <= 2
    assert result.method == method
    if method == "dbscan":
        assert result.params["eps_auto"] and result.params["eps"] > 0


def test_link_rules_on_a_hand_made_matrix():
    inf = np.inf
    #              a    b    c    d    e    f    g    h    i    j    k
    m = np.array([
        [0.0, 0.1, 0.4, inf, inf, inf, inf, 0.3, inf, inf, inf],  # a <-> b mutual
        [0.1, 0.0, inf, inf, inf, inf, inf, 0.35, inf, inf, inf],  # b
        [0.4, inf, 0.0, 0.2, inf, inf, inf, inf, inf, inf, inf],  # c -> d
        [inf, inf, 0.2, 0.0, 0.15, inf, inf, inf, inf, inf, inf],  # d -> e
        [inf, inf, inf, 0.15, 0.0, inf, inf, inf, inf, inf, inf],  # e -> d: chain c-d-e
        [inf, inf, inf, inf, inf, 0.0, 0.6, inf, inf, inf, inf],  # f, g: only above 0.5
        [inf, inf, inf, inf, inf, 0.6, 0.0, inf, inf, inf, inf],
        [0.3, 0.35, inf, inf, inf, inf, inf, 0.0, inf, inf, inf],  # h -> a joins a-b
        [inf, inf, inf, inf, inf, inf, inf, inf, 0.0, 0.2, 0.2],  # i: tie j / k -> j
        [inf, inf, inf, inf, inf, inf, inf, inf, 0.2, 0.0, 0.25],  # j -> i
        [inf, inf, inf, inf, inf, inf, inf, inf, 0.2, 0.25, 0.0],  # k -> i
    ])
    graph = graph_of(m)
    nearest = nearest_under_threshold(graph, 0.5)
    assert nearest.tolist() == [1, 0, 3, 4, 3, -1, -1, 0, 9, 8, 8]
    labels = threshold_link(graph, 0.5)
    a, b, c, d, e, f, g, h, i, j, k = labels
    assert a == b == h  # mutual pair merged, h's link joins it
    assert c == d == e  # the chain c -> d -> e <- d is one id
    assert a != c  # a-c is under the threshold, but neither is the other's nearest
    assert f == g == -1  # nothing under the threshold: outliers
    assert i == j == k and len({a, c, i}) == 3
    # through the entry point: ids by size (3, 3, 3), outliers counted
    assert threshold_link(graph, 0.12).tolist() == [0, 0] + [-1] * 9  # only a <-> b is left
    with pytest.raises(ClusteringError, match="threshold must be > 0"):
        threshold_link(graph, 0.0)


def test_outliers_are_dropped_and_counted(tmp_path):
    feats, pids = blobs(num_groups=8, sizes=(8, 12), seed=4)
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(6, feats.shape[1])).astype(np.float32)  # 6 lone images
    feats = np.concatenate([feats, noise])
    pids = np.concatenate([pids, -np.ones(6, dtype=np.int64)])
    result = cluster_features(feats, "dbscan", distance="cosine", eps=0.1, min_samples=3)
    assert result.num_clusters == 8
    assert result.labels[-6:].tolist() == [-1] * 6 and result.num_outliers == 6
    assert result.sizes.tolist() == sorted(result.sizes.tolist(), reverse=True)

    samples = [Sample(f"/img/{n}.jpg", int(p), n % 3, "train", item_id=f"{n}.jpg")
               for n, p in enumerate(pids)]
    report = write_outputs(tmp_path, Embedded(samples, feats), result, {"checkpoint": "c"})
    assert report["num_images"] == len(samples) and report["num_outliers"] == 6
    assert report["num_clusters"] == 8 and report["method"] == "dbscan"
    assert report["eps"] == 0.1 and "ari" in report and "purity" in report
    written = load_csv(
        tmp_path / "pseudo_labels.csv", need_test=False, allow_outside_root=True
    ).train
    assert len(written) == report["num_rows"] == len(samples) - 6
    assert {s.path for s in written}.isdisjoint({f"/img/{n}.jpg" for n in range(len(pids) - 6,
                                                                               len(pids))})
    assert sorted({s.pid for s in written}) == list(range(8))
    for name in ("cluster_sizes.png", "cluster_samples.png", "clustering_vs_truth.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_relabel_by_size_and_min_cluster_size():
    labels = np.array([5, 5, 5, 2, 2, 9, -1, 7, 7, 7, 7])
    assert relabel_by_size(labels, 1).tolist() == [1, 1, 1, 2, 2, 3, -1, 0, 0, 0, 0]
    assert relabel_by_size(labels, 3).tolist() == [1, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0]
    assert relabel_by_size(np.array([-1, -1]), 2).tolist() == [-1, -1]


def test_auto_eps_is_the_mean_of_the_smallest_pairs_per_image():
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    m = np.full((11, 11), np.inf)
    m[0, 1:] = m[1:, 0] = values  # a star: 11 images, 10 pairs
    assert auto_eps(graph_of(m), 3 / 11) == pytest.approx(0.2)  # mean of 0.1, 0.2, 0.3
    assert auto_eps(graph_of(m), 6.0) == pytest.approx(0.55)  # all the pairs there are
    with pytest.raises(ClusteringError, match="eps_pairs must be > 0"):
        auto_eps(graph_of(m), 0.0)


def test_too_few_pseudo_identities_is_a_clear_error():
    feats, _ = blobs(num_groups=6, seed=6)
    with pytest.raises(ClusteringError, match=r"DBSCAN found 1 cluster at eps=1.5.*try --eps "
                                              r"1 or --method kmeans"):
        cluster_features(feats, "dbscan", distance="cosine", eps=1.5)
    with pytest.raises(ClusteringError, match=r"DBSCAN found 0 clusters at eps=1e-06.*try --eps"):
        cluster_features(feats, "dbscan", distance="cosine", eps=1e-6, min_samples=4)
    with pytest.raises(ClusteringError, match=r"link found 0 clusters at threshold=1e-05"):
        cluster_features(feats, "link", distance="cosine", threshold=1e-5)
    with pytest.raises(ClusteringError, match=r"--clusters 500 is more than the \d+ images"):
        cluster_features(feats, "kmeans", clusters=500)
    with pytest.raises(ClusteringError, match="method 'hdbscan' is not known"):
        cluster_features(feats, "hdbscan")


def test_score_clustering_by_hand():
    true = np.array([0, 0, 0, 1, 1, 1, 2, -1])
    assert score_clustering(np.array([4, 4, 4, 7, 7, 7, 9, 3]), true)["ari"] == 1.0
    scores = score_clustering(np.array([0, 0, 1, 1, 1, -1, 2, 2]), true)
    # clustered and labelled: ids 0,0,0,1,1 | clusters 0,0,1,1,1 plus 2 -> purity (2+2+1)/6
    assert scores["purity"] == pytest.approx(5 / 6)
    assert scores["num_true_ids"] == 3 and scores["num_scored"] == 7
    assert scores["ari_all"] < scores["ari"]  # the outlier counts as a singleton there
    assert score_clustering(np.array([0, 0]), np.array([-1, -1])) == {}


# ---- inputs and outputs -------------------------------------------------------------------


def touch_images(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")
        paths.append(path)
    return paths


def test_unlabelled_inputs(tmp_path):
    # a folder at any depth, no labels
    touch_images(tmp_path / "crops", ["cam1/2024/a.jpg", "cam1/b.png", "c.jpeg", "notes.txt"])
    samples, kind = unlabelled_samples(tmp_path / "crops")
    assert kind == "folder" and [s.item_id for s in samples] == ["c.jpeg", "cam1/2024/a.jpg",
                                                                 "cam1/b.png"]
    assert {s.pid for s in samples} == {-1} and {s.split for s in samples} == {"train"}
    # a Market-1501 tree: its training images with pids and cameras
    touch_images(tmp_path / "market", ["bounding_box_train/0002_c1s1_000451_03.jpg",
                                       "bounding_box_train/0007_c3s2_000100_01.jpg",
                                       "query/0002_c2s1_000001_00.jpg"])
    samples, kind = unlabelled_samples(tmp_path / "market")
    assert kind == "market1501" and [(s.pid, s.camid) for s in samples] == [(2, 0), (7, 2)]
    # a CSV manifest: pid only for scoring, boxes kept, split=train rows only
    manifest = tmp_path / "m" / "list.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,pid,split,x,y,w,h\nimgs/a.jpg,3,train,1,2,10,20\n"
                        "imgs/b.jpg,,train,,,,\nimgs/q.jpg,4,query,,,,\n")
    samples, kind = unlabelled_samples(manifest)
    assert kind == "csv" and [s.pid for s in samples] == [3, -1]
    assert samples[0].box == (1, 2, 10, 20) and samples[0].path == str(manifest.parent / "imgs"
                                                                       / "a.jpg")


def test_unlabelled_input_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty: no images found at any depth"):
        unlabelled_samples(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"nothing: no such file or directory"):
        unlabelled_samples(tmp_path / "nothing")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,pid\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"bad.csv: header lacks the path column"):
        unlabelled_samples(bad)
    bad.write_text("path,pid\na.jpg,x\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: pid 'x' must be an integer"):
        unlabelled_samples(bad)
    bad.write_text("path,x,y,w,h\na.jpg,0,0,inf,4\n")  # the datasets' box rules, no overflow
    with pytest.raises(DatasetError, match=r"bad.csv:2: box w='inf' must be a finite number"):
        unlabelled_samples(bad)
    bad.write_text("path,id\na.jpg,x\nb.jpg,x\n")
    with pytest.raises(DatasetError, match=r"id 'x' is used by both .*a.jpg and .*b.jpg"):
        unlabelled_samples(bad)


def test_outputs_never_overwrite_anything(tmp_path):
    images = tmp_path / "images"
    touch_images(images, ["a.jpg"])
    out = tmp_path / "out"
    assert check_out_dir(out, images) == out.resolve()  # new folder: fine
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"already holds report.json: nothing is overwritten"):
        check_out_dir(out, images)
    with pytest.raises(DatasetError, match="lies inside the image folder"):
        check_out_dir(images / "pseudo", images)
    manifest = tmp_path / "pseudo_labels.csv"
    manifest.write_text("path\n")
    with pytest.raises(DatasetError, match="would overwrite the input manifest"):
        check_out_dir(tmp_path, manifest)


def test_pseudo_ids_never_collide_with_real_ones(tmp_path):
    labelled = tmp_path / "labelled.csv"
    with labelled.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "pid", "camid", "split"])
        for pid in (0, 1, 2, 3):  # real ids 0..3: the pseudo ids 0..2 would collide
            writer.writerows([(f"l{pid}_{n}.jpg", pid, n, "train") for n in range(2)])
        writer.writerows([("q.jpg", 9, 0, "query"), ("g.jpg", 9, 1, "gallery")])
    unlabelled = [Sample(f"/u/{n}.jpg", -1, -1, "train", item_id=f"{n}.jpg") for n in range(9)]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, -1, 2])
    assert write_pseudo_csv(unlabelled, labels, tmp_path / "pseudo_labels.csv") == 8
    merged = merge_extra_train(load_csv(labelled), [tmp_path / "pseudo_labels.csv"])
    train, pid_map = balance(merged.train)
    real = {s.pid for s in train if s.path.startswith(str(tmp_path))}
    pseudo = {s.pid for s in train if s.path.startswith("/u/")}
    assert real.isdisjoint(pseudo) and len(real) == 4 and len(pseudo) == 3
    assert len(pid_map) == 7
    # images of one pseudo id stay together, and apart from every other id
    by_path = {Path(s.path).name: s.pid for s in train}
    assert by_path["2.jpg"] == by_path["3.jpg"] == by_path["4.jpg"] != by_path["0.jpg"]


def test_the_inverted_file_search_for_large_sets_gives_nearly_the_same_graph():
    feats, pids = blobs(num_groups=80, sizes=(6, 11), noise=0.1, seed=7)  # 639 images
    exact = dense(jaccard_graph(feats, index="flat"))
    # 17 lists of ~40 images, 8 probed: approximate neighbours, so slightly other encodings
    approx = dense(jaccard_graph(feats, index="ivf", nprobe=8))
    small = exact < 0.7
    assert small.sum() > 5000 and np.isfinite(approx[small]).mean() > 0.99
    assert np.median(np.abs(approx[small] - exact[small])[np.isfinite(approx[small])]) < 0.05
    # every list probed: the exact neighbours again; only the weights' normaliser (the farthest
    # point, searched in nprobe / 8 lists) is approximate
    every_list = dense(jaccard_graph(feats, index="ivf", nprobe=16))
    np.testing.assert_allclose(every_list[small], exact[small], atol=5e-3)
    for index in ("flat", "ivf"):
        labels = cluster_features(feats, "dbscan", index=index).labels
        assert score_clustering(labels, pids)["ari_all"] > 0.95


def test_self_training_names_the_config_keys_in_clustering_errors():
    from reid_platform.pseudo.rounds import as_config_keys

    message = ("DBSCAN found 0 clusters at eps=0.6, min_samples=4 (9 images); try --eps 0.9, "
               "--min-samples 2 or --method kmeans")
    assert as_config_keys(message) == (
        "DBSCAN found 0 clusters at eps=0.6, min_samples=4 (9 images); try --set "
        "self_train.eps=0.9, --set self_train.min_samples=2 or --set self_train.method=kmeans")
