"""Sharded FAISS gallery index: exactness against numpy, recall of approximate index types,
durability (reopen, crash recovery), upsert/remove semantics and input validation."""

import json
import sqlite3
import zlib

import numpy as np
import pytest

from reid_platform.retrieval import (
    ShardedIndex,
    UnknownIdError,
    merge_topk,
    open_shard,
    read_manifest,
    shard_of,
)

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_gallery(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"img_{i:05d}" for i in range(n)], unit(rng.standard_normal((n, DIM)))


def clustered(n: int, num_clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `num_clusters` random centres (the same for every `seed`), like
    embeddings of identities."""
    centres = unit(np.random.default_rng(1234).standard_normal((num_clusters, DIM)))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(num_clusters, size=n)] + 0.15 * rng.standard_normal((n, DIM))
    return unit(points)


def brute_force(
    ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Reference top-k by inner product over all vectors."""
    scores = queries @ vectors.T  # (Q, N)
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), [[ids[j] for j in row] for row in order]


def assert_same_result(result, reference, atol: float = 1e-5) -> None:
    scores, ids = result
    ref_scores, ref_ids = reference
    assert ids == ref_ids
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, atol=atol)


@pytest.fixture
def gallery():
    return random_gallery(600)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_flat_search_matches_brute_force(tmp_path, gallery, num_shards):
    ids, vectors = gallery
    queries = unit(np.random.default_rng(1).standard_normal((25, DIM)))
    index = ShardedIndex.create(tmp_path / "idx", DIM, num_shards)
    index.add(ids, vectors, [{"pid": i} for i in range(len(ids))])
    assert index.count == len(ids)
    for k in (1, 10, 57):
        assert_same_result(index.search(queries, k), brute_force(ids, vectors, queries, k))


def test_sharding_is_deterministic_and_shards_open_alone(tmp_path, gallery):
    ids, vectors = gallery
    assert shard_of("img_00000", 4) == shard_of("img_00000", 4)
    assert shard_of("abc", 7) == 891568578 % 7  # crc32("abc"): the same in every process
    index = ShardedIndex.create(tmp_path / "idx", DIM, 4)
    index.add(ids, vectors)
    index.save()
    for shard_id in range(4):
        shard = open_shard(tmp_path / "idx", shard_id)
        expected = sorted(i for i in ids if shard_of(i, 4) == shard_id)
        assert shard.count == len(expected) > 0
        _, found = shard.search(vectors, 1)
        assert sorted({row[0] for row in found if shard_of(row[0], 4) == shard_id}) == expected
        shard.close()
    assert read_manifest(tmp_path / "idx")["counts"] == [index.shards[s].count for s in range(4)]


def test_k_larger_than_gallery_returns_fewer(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 3)
    index.add(ids[:7], vectors[:7])
    scores, found = index.search(vectors[:2], 50)
    assert scores.shape == (2, 7)
    assert all(len(row) == 7 for row in found) and -1 not in scores
    assert_same_result((scores, found), brute_force(ids[:7], vectors[:7], vectors[:2], 7))
    empty = ShardedIndex.create(tmp_path / "empty", DIM, 2)
    scores, found = empty.search(vectors[:2], 5)
    assert scores.shape == (2, 0) and found == [[], []]
    scores, found = index.search(np.empty((0, DIM), np.float32), 5)
    assert scores.shape == (0, 0) and found == []


def test_merge_topk_matches_reference():
    rng = np.random.default_rng(3)
    num_queries, n, k = 6, 90, 8
    scores = rng.standard_normal((num_queries, n)).astype(np.float32)
    names = [f"x{j}" for j in range(n)]
    # Split the columns into uneven "shards", each returning its own top-k.
    parts = []
    for cols in np.split(rng.permutation(n), [10, 13, 60]):
        local = scores[:, cols]
        order = np.argsort(-local, axis=1)[:, :k]
        parts.append(
            (np.take_along_axis(local, order, axis=1), [[names[cols[j]] for j in r] for r in order])
        )
    order = np.argsort(-scores, axis=1)[:, :k]
    reference = np.take_along_axis(scores, order, axis=1), [[names[j] for j in r] for r in order]
    assert_same_result(merge_topk(parts, k), reference, atol=0)
    assert_same_result(merge_topk(parts), reference, atol=0)  # k defaults to the widest part


def test_merge_topk_ragged_rows_and_errors():
    # Row 0 of part a has 1 valid hit; its padding (-inf, or any value) must be ignored.
    part_a = (np.array([[0.9, 123.0], [0.8, 0.1]], np.float32), [["a1"], ["a1", "a2"]])
    part_b = (np.array([[0.5], [0.95]], np.float32), [["b1"], ["b1"]])
    scores, ids = merge_topk([part_a, part_b], k=5)
    assert ids == [["a1", "b1"], ["b1", "a1", "a2"]]
    np.testing.assert_array_equal(
        scores, np.array([[0.9, 0.5, -np.inf], [0.95, 0.8, 0.1]], np.float32)
    )
    with pytest.raises(ValueError, match="at least one"):
        merge_topk([])
    with pytest.raises(ValueError, match="result 1: expected scores"):
        merge_topk([part_a, (np.zeros((3, 1), np.float32), [[], [], []])])


@pytest.mark.parametrize(
    ("index_type", "params", "min_recall"),
    [
        ("IVF64,Flat", {"nprobe": 8}, 0.95),
        ("HNSW32", {"ef_search": 64}, 0.95),
        ("IVF32,PQ16np", {"nprobe": 8}, 0.8),  # 16 bytes a vector; np: no polysemous training
    ],
)
@pytest.mark.parametrize("num_shards", [1, 3])
def test_approximate_recall_at_10(tmp_path, index_type, params, min_recall, num_shards):
    vectors = clustered(4000, num_clusters=50, seed=0)
    ids = [f"g{i}" for i in range(len(vectors))]
    queries = clustered(100, num_clusters=50, seed=1)
    index = ShardedIndex.create(tmp_path / "idx", DIM, num_shards, index_type=index_type)
    index.add(ids, vectors)
    index.set_search_params(**params)
    _, found = index.search(queries, 10)
    _, exact = brute_force(ids, vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall >= min_recall, f"{index_type} recall@10 {recall:.3f}"


# Search parameters that make each index type exhaustive on 600 items, so results are exact.
SEARCH_ALL = {"Flat": {}, "IVF16,Flat": {"nprobe": 16}, "HNSW16": {"ef_search": 600}}


@pytest.mark.parametrize("index_type", list(SEARCH_ALL))
def test_add_remove_upsert_then_reopen(tmp_path, gallery, index_type):
    ids, vectors = gallery
    new_vectors = unit(np.random.default_rng(5).standard_normal((20, DIM)))
    queries = np.concatenate([vectors[:10], new_vectors[:10]])
    index = ShardedIndex.create(tmp_path / "idx", DIM, 3, index_type=index_type, extra={"ck": 1})
    index.add(ids, vectors, [{"pid": i % 50, "camid": i % 6} for i in range(len(ids))])
    index.set_search_params(**SEARCH_ALL[index_type])

    assert index.remove(ids[:30] + ids[:5]) == 30  # duplicates count once
    index.add(ids[30:50], new_vectors, [{"pid": -1}] * 20)  # upsert: same ids, new vectors
    assert index.count == len(ids) - 30
    assert index.get_metadata([ids[30], ids[60]]) == [{"pid": -1}, {"pid": 10, "camid": 0}]
    if index_type == "HNSW16":
        assert sum(s.num_tombstones for s in index.shards) == 50  # 30 removed + 20 replaced

    live_ids = ids[30:]
    live_vectors = np.concatenate([new_vectors, vectors[50:]])
    expected = brute_force(live_ids, live_vectors, queries, 10)
    before = index.search(queries, 10)
    assert_same_result(before, expected)
    assert before[1][10][0] == ids[30]  # the new vector of an upserted id is found
    index.save()
    index.close()

    reopened = ShardedIndex.open(tmp_path / "idx")
    reopened.set_search_params(**SEARCH_ALL[index_type])
    assert reopened.count == len(live_ids)
    assert reopened.extra == {"ck": 1}
    after = reopened.search(queries, 10)
    assert_same_result(after, before)
    if index_type == "HNSW16":  # tombstones survive a reopen until compact() (or save() > 25%)
        assert sum(s.num_tombstones for s in reopened.shards) == 50
        for shard in reopened.shards:
            shard.compact()
        assert sum(s.num_tombstones for s in reopened.shards) == 0
        assert_same_result(reopened.search(queries, 10), expected)


def test_remove_unknown_id(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2)
    index.add(ids[:10], vectors[:10])
    with pytest.raises(KeyError, match="unknown gallery id 'ghost'") as excinfo:
        index.remove([ids[0], "ghost"])
    assert isinstance(excinfo.value, UnknownIdError) and excinfo.value.ids == ["ghost"]
    assert index.count == 10  # nothing removed when any id is unknown
    shard = index.shards[shard_of("ghost", 2)]
    with pytest.raises(UnknownIdError, match="'ghost'"):
        shard.remove(["ghost"])
    with pytest.raises(UnknownIdError, match="'nobody'"):
        index.get_metadata(["nobody"])


@pytest.mark.parametrize("index_type", list(SEARCH_ALL))
def test_crash_recovery_from_db(tmp_path, gallery, index_type):
    ids, vectors = gallery
    path = tmp_path / "idx"
    index = ShardedIndex.create(path, DIM, 2, index_type=index_type)
    index.add(ids[:300], vectors[:300])
    index.save()
    # Writes after the last snapshot are in the db only: a crash here must lose nothing.
    index.add(ids[300:], vectors[300:])
    index.remove(ids[:40])
    index.add(ids[40:45], vectors[40:45], [{"pid": 1}] * 5)  # upsert with the same vectors
    index.close()  # no save(): index.faiss files are behind the db

    expected = brute_force(ids[40:], vectors[40:], vectors[:50], 10)
    recovered = ShardedIndex.open(path)
    recovered.set_search_params(**SEARCH_ALL[index_type])
    assert recovered.count == len(ids) - 40
    assert recovered.get_metadata([ids[40]]) == [{"pid": 1}]
    assert_same_result(recovered.search(vectors[:50], 10), expected)
    recovered.close()

    (path / "shard_0" / "index.faiss").unlink()  # snapshot lost
    snapshot = path / "shard_1" / "index.faiss"
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # snapshot truncated
    rebuilt = ShardedIndex.open(path)
    rebuilt.set_search_params(**SEARCH_ALL[index_type])
    assert_same_result(rebuilt.search(vectors[:50], 10), expected)
    rebuilt.save()
    assert not list(path.glob("shard_*/.*tmp*"))  # atomic writes leave no temp files


def test_reads_see_writes_of_another_connection(tmp_path, gallery):
    ids, vectors = gallery
    writer = ShardedIndex.create(tmp_path / "idx", DIM, 1)
    reader = open_shard(tmp_path / "idx", 0)  # e.g. a second Serve replica of shard 0
    assert reader.count == 0
    writer.add(ids[:20], vectors[:20])
    assert reader.count == 20  # caught up by itself (PRAGMA data_version), no refresh()
    writer.remove(ids[:5])
    assert_same_result(reader.search(vectors[:3], 4), writer.search(vectors[:3], 4))
    assert reader.stats()["count"] == 15 and writer.stats()["count"] == 15
    reader.refresh()  # still there: a forced full re-read
    assert reader.count == 15 and ids[5] in reader and ids[0] not in reader


def test_writes_are_committed_before_ack(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 1)
    index.add(ids[:5], vectors[:5], [{"path": f"/g/{i}.jpg"} for i in ids[:5]])
    # A second connection (another process) sees the committed rows and exact vectors.
    db = sqlite3.connect(tmp_path / "idx" / "shard_0" / "shard.sqlite")
    rows = db.execute("SELECT item_id, vector, metadata FROM items ORDER BY label").fetchall()
    db.close()
    assert [r[0] for r in rows] == ids[:5]
    np.testing.assert_array_equal(np.frombuffer(rows[2][1], np.float32), vectors[2])
    assert json.loads(rows[2][2]) == {"path": f"/g/{ids[2]}.jpg"}
    np.testing.assert_array_equal(index.shards[0].get_vectors([ids[2], ids[0]]), vectors[[2, 0]])


def test_manifest(tmp_path):
    ShardedIndex.create(tmp_path / "idx", DIM, 2, "IVF8,Flat", extra={"checkpoint": "/ck.pt"})
    manifest = read_manifest(tmp_path / "idx")
    assert manifest["dim"] == DIM and manifest["num_shards"] == 2
    assert manifest["index_type"] == "IVF8,Flat" and manifest["metric"] == "ip"
    assert manifest["counts"] == [0, 0] and manifest["extra"] == {"checkpoint": "/ck.pt"}
    with pytest.raises(FileExistsError, match="already exists"):
        ShardedIndex.create(tmp_path / "idx", DIM, 2)
    with pytest.raises(FileNotFoundError, match="no index manifest"):
        ShardedIndex.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="shard_id 5 out of range"):
        open_shard(tmp_path / "idx", 5)


def test_too_few_vectors_to_train(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2, index_type="IVF1024,Flat")
    with pytest.raises(ValueError, match=r"'IVF1024,Flat' needs at least 1024 .* got 600"):
        index.add(ids, vectors)
    assert index.count == 0


def test_train_on_a_sample_then_add_small_batches(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2, index_type="IVF8,Flat")
    with pytest.raises(ValueError, match="needs at least 8 training vectors, got 3"):
        index.add(ids[:3], vectors[:3])
    index.train(vectors, max_train_vectors=200)
    index.add(ids[:3], vectors[:3])
    index.add(ids[3:6], vectors[3:6])
    index.set_search_params(nprobe=8)
    assert_same_result(
        index.search(vectors[:6], 6), brute_force(ids[:6], vectors[:6], vectors[:6], 6)
    )
    with pytest.raises(ValueError, match="already holds vectors"):
        index.train(vectors)
    reopened = open_shard(tmp_path / "idx", 0)  # the trained index reached every shard's db
    assert reopened.is_trained


def test_input_validation(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2)
    with pytest.raises(ValueError, match="dimension 16, the index expects 32"):
        index.add(ids[:3], vectors[:3, :16])
    with pytest.raises(ValueError, match="got 3 ids but 4 vectors"):
        index.add(ids[:3], vectors[:4])
    with pytest.raises(ValueError, match="got 2 ids but 1 metadata"):
        index.add(ids[:2], vectors[:2], [{}])
    with pytest.raises(ValueError, match=r"2-D array \(N, 32\), got shape \(32,\)"):
        index.add(ids[:1], vectors[0])
    with pytest.raises(ValueError, match="L2-normalised .* 'img_00001' has norm 2.0000"):
        index.add(ids[:2], vectors[:2] * np.array([[1.0], [2.0]], np.float32))
    with pytest.raises(ValueError, match="duplicate id 'img_00000'"):
        index.add([ids[0], ids[0]], vectors[:2])
    with pytest.raises(ValueError, match="NaN or inf"):
        index.add(ids[:1], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        index.add(ids[:1], vectors[:1], [{"path": object()}])
    with pytest.raises(TypeError, match="non-empty strings, got 7"):
        index.add([7], vectors[:1])
    with pytest.raises(ValueError, match="queries must be a 2-D array"):
        index.search(vectors[0], 5)
    with pytest.raises(ValueError, match="queries have dimension 8"):
        index.search(vectors[:2, :8], 5)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        index.search(vectors[:2], 0)
    with pytest.raises(ValueError, match="'Flat' has no search parameter 'nprobe'"):
        index.set_search_params(nprobe=8)
    with pytest.raises(ValueError, match="not a FAISS factory string"):
        ShardedIndex.create(tmp_path / "bad", DIM, 1, index_type="NoSuchIndex")
    with pytest.raises(ValueError, match="metric must be one of"):
        ShardedIndex.create(tmp_path / "bad2", DIM, 1, metric="cosine")
    shard = index.shards[0]
    foreign = next(i for i in ids if shard_of(i, 2) == 1)
    with pytest.raises(ValueError, match=f"id '{foreign}' belongs to shard 1, not shard 0"):
        shard.add([foreign], vectors[:1])
    assert index.count == 0


def test_l2_metric_scores_are_negative_distances(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2, metric="l2")
    index.add(ids[:50], 3 * vectors[:50])  # l2 does not require unit vectors
    scores, found = index.search(vectors[:3], 4)
    distances = ((vectors[:3, None, :] - 3 * vectors[None, :50, :]) ** 2).sum(-1)  # (3, 50)
    order = np.argsort(distances, axis=1)[:, :4]
    assert found == [[ids[j] for j in row] for row in order]
    np.testing.assert_allclose(scores, -np.take_along_axis(distances, order, axis=1), rtol=1e-5)


# ---- several writers -------------------------------------------------------------------


def test_labels_are_never_reused_across_writers(tmp_path, gallery):
    """Two writers of one shard (a service and a build_index re-run): the second's in-memory
    state is behind. Neither collides, and after a delete no label is reused, so on reopen
    every id is served with its own vector (before: the deleted item's vector under a new id)."""
    ids, vectors = gallery
    path = tmp_path / "idx"
    ShardedIndex.create(path, DIM, 1).close()
    a, b = ShardedIndex.open(path), ShardedIndex.open(path)
    b.add(["x"], vectors[:1])
    b.save()  # the snapshot holds x's vector under its label
    b.remove(["x"])
    a.add(["y"], vectors[1:2])  # a never saw x: a stale counter would give y x's label
    a.add(["z"], vectors[2:3])
    b.add(["w"], vectors[3:4])
    labels = [
        row[0]
        for row in sqlite3.connect(path / "shard_0" / "shard.sqlite").execute(
            "SELECT label FROM items ORDER BY label"
        )
    ]
    assert labels == [1, 2, 3]  # x had 0
    a.close()
    b.close()
    with ShardedIndex.open(path) as index:
        assert index.count == 3 and "x" not in index
        scores, found = index.search(vectors[:4], 1)
        assert [row[0] for row in found[1:]] == ["y", "z", "w"]
        np.testing.assert_allclose(scores[1:, 0], 1.0, atol=1e-5)
        assert found[0][0] != "x"


WRITER = """
import sys
import zlib
import numpy as np
from reid_platform.retrieval import ShardedIndex
path, name = sys.argv[1], sys.argv[2]
index = ShardedIndex.open(path)
def vec(item_id):  # each id's vector is a function of the id, known to the checker
    v = np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(32)
    return (v / np.linalg.norm(v)).astype(np.float32)[None, :]
for n in range(60):
    own = f"{name}-{n}"
    index.add([own], vec(own), [{"writer": name}])
    shared = f"shared-{n % 7}"  # both writers upsert these
    index.add([shared], vec(shared), [{"writer": name}])
    if n % 3 == 0:
        index.remove([own])
index.close()
"""


def id_vector(item_id: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_two_writer_processes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "idx"
    ShardedIndex.create(path, DIM, 2).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name], stderr=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err  # no IntegrityError, no lock error
    expected = sorted(
        [f"{w}-{n}" for w in "ab" for n in range(60) if n % 3] + [f"shared-{n}" for n in range(7)]
    )
    with ShardedIndex.open(path) as index:
        assert index.count == len(expected)
        assert all(i in index for i in expected)
        queries = np.stack([id_vector(i) for i in expected])
        scores, found = index.search(queries, 1)
        assert [row[0] for row in found] == expected  # every id has its own vector
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        db = sqlite3.connect(path / "shard_0" / "shard.sqlite")
        labels = [r[0] for r in db.execute("SELECT label FROM items")]
        assert len(labels) == len(set(labels))


def test_a_writer_that_holds_the_lock_too_long_is_reported(tmp_path, gallery, monkeypatch):
    import reid_platform.retrieval.index as index_module
    from reid_platform.retrieval.index import ShardLockedError

    ids, vectors = gallery
    ShardedIndex.create(tmp_path / "idx", DIM, 1).close()
    monkeypatch.setattr(index_module, "WRITE_LOCK_TIMEOUT_S", 0.2)
    shard = open_shard(tmp_path / "idx", 0)
    other = sqlite3.connect(tmp_path / "idx" / "shard_0" / "shard.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    with pytest.raises(ShardLockedError, match=r"shard_0/shard.sqlite: another writer held"):
        shard.add(ids[:1], vectors[:1])
    other.execute("ROLLBACK")
    shard.add(ids[:1], vectors[:1])  # the lock is free again
    assert shard.count == 1 and shard.search(vectors[:1], 1)[1] == [[ids[0]]]


# ---- metadata filters ------------------------------------------------------------------

FILTERS = [
    ({"camid": 2}, None),
    ({"camid": [1, 3]}, None),
    (None, {"camid": 2}),
    ({"camid": [0, 1, 2]}, {"pid": [4, 5, 6]}),
    ({"pid": 7, "camid": 1}, None),  # few matches: fewer than k
    ({"flag": True}, None),  # JSON true, not 1
    ({"name": "n3"}, None),
    ({"camid": 99}, None),  # matches nothing
    (None, {"pid": 3, "camid": 0}),  # the re-ID protocol: drop same pid and same camera
]


def matches(meta: dict, spec: dict | None) -> bool:
    """Reference: every key equals one of its values (JSON equality, bool is not int)."""
    if not spec:
        return True
    for key, value in spec.items():
        values = value if isinstance(value, list) else [value]
        if key not in meta or not any(
            meta[key] == v and isinstance(meta[key], bool) == isinstance(v, bool) for v in values
        ):
            return False
    return True


@pytest.mark.parametrize("index_type", ["Flat", "IVF16,Flat"])
@pytest.mark.parametrize(("where", "exclude"), FILTERS)
def test_filters_equal_brute_force_over_matching_items(
    tmp_path, gallery, index_type, where, exclude
):
    ids, vectors = gallery
    metadata = [
        {
            "pid": i % 10,
            "camid": i % 4,
            "flag": i % 5 == 0,
            "n": 1 if i % 5 == 0 else 0,
            "name": f"n{i % 6}",
        }
        for i in range(len(ids))
    ]
    queries = unit(np.random.default_rng(7).standard_normal((12, DIM)))
    index = ShardedIndex.create(tmp_path / "idx", DIM, 3, index_type=index_type)
    index.add(ids, vectors, metadata)
    index.remove(ids[:20])  # removed items never come back, filtered or not
    if index_type != "Flat":
        index.set_search_params(nprobe=16)  # every list: exact
    keep = [
        j
        for j in range(20, len(ids))
        if matches(metadata[j], where) and not (exclude and matches(metadata[j], exclude))
    ]
    for k in (1, 10, 40):
        reference = brute_force([ids[j] for j in keep], vectors[keep], queries, k)
        if not keep:
            reference = (np.empty((len(queries), 0), np.float32), [[] for _ in queries])
        assert_same_result(index.search(queries, k, where=where, exclude=exclude), reference)
    scores, found, meta = index.search_with_metadata(queries, 5, where=where, exclude=exclude)
    assert found == index.search(queries, 5, where=where, exclude=exclude)[1]
    assert all(
        m == metadata[ids.index(i)]
        for row_ids, row_meta in zip(found, meta)
        for i, m in zip(row_ids, row_meta)
    )


def test_filter_errors_name_the_argument(tmp_path, gallery):
    ids, vectors = gallery
    index = ShardedIndex.create(tmp_path / "idx", DIM, 2)
    index.add(ids[:10], vectors[:10])
    for where, message in [
        ({"camid": {"gt": 3}}, r"where.camid: values must be strings, numbers"),
        ({"camid": float("nan")}, r"where.camid: nan is not a finite number"),
        ({"camid": []}, r"where.camid: an empty list matches nothing"),
        ([1, 2], r"where must be an object"),
        ({"": 1}, r"where: keys must be non-empty strings"),
    ]:
        with pytest.raises(ValueError, match=message):
            index.search(vectors[:1], 3, where=where)
    with pytest.raises(ValueError, match="exclude.pid"):
        index.search(vectors[:1], 3, exclude={"pid": [[1]]})
