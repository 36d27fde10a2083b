"""Pieces of the retrieval service that need no Ray: fitting the app to the cluster's CPUs,
id checks, result paths."""

from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from serve_apps.retrieval import (
    MIN_EMBEDDER_CPUS,
    ResourceFitError,
    RetrievalIngress,
    check_item_id,
    plan_cpus,
)


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_any_index_fits_a_2_cpu_machine(num_shards):
    cpus = plan_cpus(num_shards, 1, 1, cluster_cpus=2.0)
    total = cpus["embedder"] + num_shards * cpus["shard"] + cpus["ingress"]
    assert total <= 2.0 + 1e-9
    assert cpus["shard"] == cpus["ingress"] == 0.1  # light: 0.1 each, under a quarter of 2
    assert cpus["embedder"] == pytest.approx(2.0 - 0.1 * (num_shards + 1))  # the rest


def test_light_deployments_shrink_to_a_quarter_of_the_cluster():
    cpus = plan_cpus(16, 2, 2, cluster_cpus=4.0)  # 33 light replicas
    assert cpus["shard"] == cpus["ingress"] == pytest.approx(0.03)  # floor(1.0 / 33, 0.01)
    assert 2 * cpus["embedder"] + 33 * 0.03 <= 4.0
    assert cpus["embedder"] >= MIN_EMBEDDER_CPUS
    assert plan_cpus(3, 1, 1, cluster_cpus=64.0, node_cpus=16.0)["embedder"] == 16.0  # one node
    explicit = plan_cpus(3, 1, 1, cluster_cpus=8.0, embedder=2.0, shard=0.5, ingress=0.3)
    assert explicit == {"embedder": 2.0, "shard": 0.5, "ingress": 0.3}


def test_what_cannot_fit_is_refused_naming_asked_and_available():
    # The old fixed requests on this machine: 1 + 3 x 0.25 + 0.5 = 2.25 CPUs of 2.
    with pytest.raises(ResourceFitError) as err:
        plan_cpus(3, 1, 1, cluster_cpus=2.0, embedder=1.0, shard=0.25, ingress=0.5)
    assert str(err.value).startswith(
        "the retrieval app asks for 2.25 CPUs (Embedder 1 x 1, 3 shards x 1 replicas x 0.25, "
        "ingress 0.5) but the Ray cluster has 2 CPUs"
    )
    # 16 shards + ingress at the 0.01 floor leave 0.08 of 0.25 CPUs: less than an Embedder needs.
    with pytest.raises(ResourceFitError, match=r"needs at least 0\.42 CPUs .* has 0\.25 CPUs"):
        plan_cpus(16, 1, 1, cluster_cpus=0.25)
    with pytest.raises(ResourceFitError, match="its largest node has 4"):
        plan_cpus(1, 1, 1, cluster_cpus=8.0, node_cpus=4.0, embedder=6.0)


@pytest.mark.parametrize(
    ("item_id", "words"),
    [
        ("", "non-empty"),
        ("x" * 1025, "<= 1024"),
        (7, "non-empty string"),
        ("a\nb", "U+000A"),
        ("a\x00", "U+0000"),
        ("a\u2028b", "U+2028"),
        ("a\ud800", "U+D800"),
        ("a/../b", "'..' path segment"),
        ("./x", "'.' or '..'"),
    ],
)
def test_ids_that_could_not_be_deleted_later_are_refused(item_id, words):
    with pytest.raises(HTTPException) as err:
        check_item_id(item_id, "id of item 0")
    assert err.value.status_code == 422
    assert "id of item 0" in err.value.detail and words in err.value.detail


def test_good_ids_pass():
    for item_id in ("bounding_box_test/0001_c1s1_000151_01.jpg", "a b", "日本/写真.jpg", "..x"):
        assert check_item_id(item_id) == item_id


def test_result_paths_follow_the_setting():
    public = RetrievalIngress.func_or_class._public
    meta = {"path": "/data/market/bounding_box_test/1.jpg", "pid": 1}

    def answer(mode, root="/data/market"):
        holder = SimpleNamespace(metadata_path=mode, _gallery_root=PurePosixPath(root))
        return public(holder, meta)

    assert answer("relative") == {"path": "bounding_box_test/1.jpg", "pid": 1}
    assert answer("relative", "/elsewhere") == {"pid": 1}  # outside the root: never shown
    assert answer("omit") == {"pid": 1}
    assert answer("absolute") == meta
    assert public(
        SimpleNamespace(metadata_path="relative", _gallery_root=None), {"path": "r.jpg"}
    ) == {"path": "r.jpg"}


def test_coalesced_shard_search_equals_each_request_alone(tmp_path):
    """The shard's batch handler: requests with different k and filters, searched together
    (one FAISS call per distinct filter), each get exactly what searching alone gives."""
    from collections import Counter

    import numpy as np

    from reid_platform.retrieval import ShardedIndex, open_shard
    from serve_apps.retrieval import IndexShard

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"g{i}" for i in range(300)]
    with ShardedIndex.create(tmp_path / "idx", 16, 1) as index:
        index.add(ids, vectors, [{"camid": i % 3, "pid": i % 17} for i in range(300)])
    shard = open_shard(tmp_path / "idx", 0)
    holder = SimpleNamespace(shard=shard, batch_sizes=Counter())
    requests = []
    for n in range(12):
        queries = rng.standard_normal((1 + n % 3, 16)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        where = [None, {"camid": 1}, {"pid": [2, 3]}][n % 3]
        exclude = {"camid": 0} if n % 4 == 0 else None
        requests.append({"queries": queries, "k": 1 + 3 * n, "where": where, "exclude": exclude})
    together = IndexShard.func_or_class._search_many(holder, requests)
    for request, got in zip(requests, together):
        scores, found, meta = shard.search_with_metadata(
            request["queries"], request["k"], request["where"], request["exclude"]
        )
        assert got["ids"] == found and got["metadata"] == meta
        np.testing.assert_array_equal(got["scores"], scores)
    # 12 requests, 6 distinct filters: 6 FAISS calls of several requests' queries each
    assert sum(holder.batch_sizes.values()) == 6
    assert sum(s * n for s, n in holder.batch_sizes.items()) == sum(
        len(r["queries"]) for r in requests
    )
