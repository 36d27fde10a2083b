"""Sharded, durable FAISS gallery index.

The gallery is split into `num_shards` shards; an item lives in shard
`crc32(id) % num_shards`, so a given id always lands in the same shard and a Serve deployment
can open only its own shard (`open_shard`). The ingress fans a query out to every shard and
merges the per-shard top-k with `merge_topk`.

On-disk layout::

    index_dir/
      manifest.json          # format_version, dim, metric, index_type, num_shards, shard_hash,
                             # counts (as of the last ShardedIndex.save), extra (user fields)
      shard_0/
        shard.sqlite         # source of truth: items(label, item_id, vector, metadata) + settings
        index.faiss          # snapshot of the FAISS index (int64 labels), rebuilt/replayed from
                             # shard.sqlite on open when it is behind, missing or corrupt
      shard_1/ ...

Durability: every add/remove is committed to SQLite (WAL journal, synchronous=FULL, so the
commit is fsynced) before the call returns and before the in-memory FAISS index changes. The
FAISS file is only a snapshot, written by `save()` to a temporary file, fsynced and moved into
place with `os.replace`, so a crash leaves either the old or the new snapshot, never half of one.

Every stored vector gets a fresh int64 *label* (the id FAISS sees). Labels are never reused, an
upsert gets a new label, so the set of labels is a complete version of the shard: on open, labels
in the snapshot but not in the db were removed since the snapshot, labels in the db but not in
the snapshot were added since, and replaying the difference brings the snapshot up to date. The
db keeps the float32 vectors and the trained (empty) index, so a shard can be rebuilt exactly.
IVF indexes store the labels in their inverted lists; every other type is wrapped in
IndexIDMap2 (not IVF: its remove_ids reorders the lists, which breaks IndexIDMap).

Upsert: adding an id that exists replaces its vector and metadata (the old label is removed).
Removing an id that does not exist raises `UnknownIdError`, a KeyError (HTTP 404).

Training: IVF/PQ types are trained once, on a seeded sample of the first batch added (or on what
`ShardedIndex.train` is given), and the trained empty index is copied to every shard.

GPU: when faiss-gpu sees a GPU, Flat/IVF shards search on a copy made by
`faiss.index_cpu_to_all_gpus` (re-made lazily after writes); the CPU index stays the durable one.

Concurrency: a `Shard` serialises its own calls with a lock (batch your queries). Any number of
processes may open and write the same shard (Serve replicas, a `build_index` re-run, library
users): every write is one SQLite `BEGIN IMMEDIATE` transaction, which is the cross-process
write lock (a second writer waits, up to WRITE_LOCK_TIMEOUT_S, then gets ShardLockedError);
holding it, the shard first catches up with the others' commits, then takes its labels from the
db's `next_label`, so two writers never collide and a label is never reused, deletes included.
Every read first checks `PRAGMA data_version` (microseconds) and re-reads the db when another
connection committed, so each process sees the others' writes.

Filters: `search(..., where={"camid": 3}, exclude={"pid": 7})` restricts a search to items whose
metadata match (`check_filter`): the matching labels come from SQLite (JSON1) and go to FAISS as
an IDSelector, so a Flat shard returns the exact top-k among matching items, never a post-filter
with fewer than k hits when k items match. IVF and HNSW shards filter inside their approximate
search (HNSW may then find fewer than k).

Removal: indexes that support `remove_ids` (Flat, IVF*, PQ) drop the vectors. Those that do not
(HNSW) keep them as *tombstones*: the label is gone from the db, search over-fetches by the
number of tombstones and filters them out, and `compact()` (run by `save()` once tombstones
exceed a quarter of the index) rebuilds the index from the db without them.

Scores: metric "ip" (the default; vectors must be L2-normalised, so score = cosine similarity)
returns inner products; metric "l2" returns negative squared distances. Either way larger is
better, which is what `merge_topk` relies on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SNAPSHOT_NAME = "index.faiss"
DB_NAME = "shard.sqlite"
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
DEFAULT_MAX_TRAIN_VECTORS = 200_000
# save() rebuilds an index that cannot remove_ids once this fraction of it is tombstones.
COMPACT_TOMBSTONE_FRACTION = 0.25
# FAISS GPU search supports k <= 2048; larger over-fetches run on the CPU copy.
GPU_MAX_K = 2048
_NORM_TOLERANCE = 1e-3
_SQL_CHUNK = 900  # below SQLite's bound-parameter limit on every build
# A writer waits this long for another writer's transaction (they last milliseconds).
WRITE_LOCK_TIMEOUT_S = 60.0
SHARD_DIR_FORMAT = "shard_{}"

# (scores (Q, k) float32 with -inf after the valid hits of each row, ids: Q lists of str)
SearchResult = tuple[np.ndarray, list[list[str]]]


class UnknownIdError(KeyError):
    """An id that is not in the gallery (the service maps it to 404)."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:5])
        more = f" and {len(self.ids) - 5} more" if len(self.ids) > 5 else ""
        super().__init__(f"unknown gallery id {shown}{more}")

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class ShardLockedError(RuntimeError):
    """Another writer held a shard's write lock longer than WRITE_LOCK_TIMEOUT_S."""


FilterValue = str | int | float | bool | None


def check_filter(spec: Mapping[str, Any] | None, name: str = "where") -> dict[str, list[Any]]:
    """A metadata filter as {key: [values]}: an item matches when, for every key, its metadata
    value equals one of the values (JSON equality: 3 == 3.0, "3" != 3, true != 1).

    Args:
        spec: {key: value} or {key: [value, ...]} with str / int / float / bool / null values;
            None or {} means no filter.
        name: the argument's name, for errors ("where", "exclude").

    Raises:
        ValueError: naming the argument and the key whose value is not allowed.
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name} must be an object of metadata key: value, got {spec!r}")
    out: dict[str, list[Any]] = {}
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: keys must be non-empty strings, got {key!r}")
        values = list(value) if isinstance(value, list | tuple) else [value]
        if not values:
            raise ValueError(f"{name}.{key}: an empty list matches nothing; give a value")
        for v in values:
            if not isinstance(v, FilterValue):
                raise ValueError(
                    f"{name}.{key}: values must be strings, numbers, booleans or null, got {v!r}"
                )
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name}.{key}: {v!r} is not a finite number")
        out[key] = values
    return out


def shard_of(item_id: str, num_shards: int) -> int:
    """Shard that holds `item_id`: crc32 of its UTF-8 bytes mod `num_shards` (stable)."""
    return zlib.crc32(item_id.encode("utf-8")) % num_shards


def merge_topk(results: Sequence[SearchResult], k: int | None = None) -> SearchResult:
    """Merge per-shard top-k results into a global top-k.

    Args:
        results: one `(scores, ids)` per shard, as returned by `Shard.search`: scores (Q, k_i)
            float32, larger is better; ids Q lists, row q holding the len(ids[q]) <= k_i valid
            hits (scores past them are ignored).
        k: hits to keep per query; defaults to the largest k_i.

    Returns:
        scores (Q, k') float32 with k' = min(k, most valid hits of any row), each row sorted
        descending and padded with -inf after its valid hits; ids Q lists of the hit ids. Equal
        scores keep the order of `results`.
    """
    if not results:
        raise ValueError("merge_topk needs at least one (scores, ids) result, got none")
    num_queries = results[0][0].shape[0]
    blocks = []
    for i, (scores, ids) in enumerate(results):
        if scores.ndim != 2 or scores.shape[0] != num_queries or len(ids) != num_queries:
            raise ValueError(
                f"result {i}: expected scores (Q={num_queries}, k) and {num_queries} id lists, "
                f"got scores {scores.shape} and {len(ids)} id lists"
            )
        valid = np.arange(scores.shape[1])[None, :] < np.array([len(r) for r in ids])[:, None]
        blocks.append(np.where(valid, scores, -np.inf).astype(np.float32))
    if k is None:
        k = max(scores.shape[1] for scores, _ in results)
    _check_k(k)
    all_scores = np.concatenate(blocks, axis=1)  # (Q, sum k_i)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]  # (Q, min(k, sum k_i))
    top = np.take_along_axis(all_scores, order, axis=1)
    num_valid = np.isfinite(top).sum(axis=1)  # (Q,)
    width = int(num_valid.max(initial=0))
    merged_ids = []
    for q in range(num_queries):
        # Row q of every block padded to the block's width, so `order` indexes it directly.
        flat: list[str | None] = []
        for (_, ids), block in zip(results, blocks):
            flat.extend(ids[q])
            flat.extend([None] * (block.shape[1] - len(ids[q])))
        merged_ids.append([flat[j] for j in order[q, : num_valid[q]]])
    return np.ascontiguousarray(top[:, :width]), merged_ids


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `index_dir/manifest.json`.

    Returns:
        The manifest: format_version, dim, metric, index_type, num_shards, shard_hash, counts
        (per shard, as of the last `ShardedIndex.save`), extra (user fields).
    """
    path = Path(index_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no index manifest at {path}; create one with ShardedIndex.create")
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    return manifest


class Shard:
    """One shard: a FAISS index in memory over a SQLite db on disk. Thread-safe, and safe with
    several writer processes (see the module docstring, "Concurrency").

    Open with `open_shard(index_dir, shard_id)`; `ShardedIndex` holds one per shard.
    """

    def __init__(
        self, shard_dir: Path, use_gpu: bool | None = None, lock_timeout_s: float | None = None
    ):
        self.shard_dir = shard_dir
        self._lock = threading.RLock()
        self._lock_timeout_s = WRITE_LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
        self._db = _connect(shard_dir / DB_NAME, self._lock_timeout_s)
        self._search_params: dict[str, int] = {}
        self._use_gpu = _gpu_available() if use_gpu is None else use_gpu
        self._gpu_index: faiss.Index | None = None
        self._filter_cache: dict[str, np.ndarray] = {}
        try:
            # The version first: a commit between it and the read below only causes one more
            # re-read later, never a missed one.
            self._version = self._data_version()
            self._db.execute("BEGIN")  # one consistent snapshot of settings, items and vectors
            try:
                settings = dict(self._db.execute("SELECT key, value FROM settings"))
                self.shard_id = int(settings["shard_id"])
                self.num_shards = int(settings["num_shards"])
                self.dim = int(settings["dim"])
                self.metric = str(settings["metric"])
                self.index_type = str(settings["index_type"])
                self._template: bytes = settings["template"]  # serialised empty index
                self._label_to_id: dict[int, str] = dict(
                    self._db.execute("SELECT label, item_id FROM items")
                )
                self._id_to_label = {i: label for label, i in self._label_to_id.items()}
                self._index = self._load_snapshot()
            finally:
                self._db.execute("COMMIT")
        except Exception:
            self._db.close()
            raise

    # ---------------------------------------------------------------- properties
    @property
    def count(self) -> int:
        """Number of live items in the shard (including other writers' commits)."""
        with self._lock:
            self._catch_up()
            return len(self._label_to_id)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, item_id: object) -> bool:
        with self._lock:
            self._catch_up()
            return item_id in self._id_to_label

    @property
    def is_trained(self) -> bool:
        with self._lock:
            self._catch_up()
            return bool(self._index.is_trained)

    @property
    def num_tombstones(self) -> int:
        """Removed vectors still inside an index without `remove_ids` (HNSW)."""
        with self._lock:
            self._catch_up()
            return self._tombstones()

    # ---------------------------------------------------------------- writes
    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Add items, replacing the vector and metadata of ids already present (upsert).

        The write is committed and fsynced to the shard db before this returns. An untrained
        shard (IVF/PQ opened on its own) is first trained on `vectors`.

        Args:
            ids: N unique string ids; all must belong to this shard (`shard_of`).
            vectors: (N, dim) float32, L2-normalised when the metric is "ip".
            metadata: N JSON-serialisable dicts (path, pid, camid, ...); None stores {}.

        Raises:
            ValueError: bad ids, vectors or metadata (nothing is written).
            ShardLockedError: another writer held the shard's write lock too long.
        """
        ids, vectors, rows_meta = _check_items(ids, vectors, metadata, self.dim, self.metric)
        foreign = [i for i in ids if shard_of(i, self.num_shards) != self.shard_id]
        if foreign:
            raise ValueError(
                f"id {foreign[0]!r} belongs to shard {shard_of(foreign[0], self.num_shards)}, "
                f"not shard {self.shard_id} ({len(foreign)} such ids)"
            )
        if not ids:
            return
        with self._lock:
            with self._writing():  # all of it is on disk, or none of it
                if not self._index.is_trained:
                    template = train_template(self.index_type, self.metric, vectors)
                    self._install_template(template)
                # The next label comes from the db, under the write lock: unique across every
                # writer and never reused, even after deletes.
                first = int(self._get_setting("next_label"))
                labels = np.arange(first, first + len(ids), dtype=np.int64)
                replaced = [self._id_to_label[i] for i in ids if i in self._id_to_label]
                self._db.executemany(
                    "DELETE FROM items WHERE item_id = ?",
                    [(i,) for i in ids if i in self._id_to_label],
                )
                self._db.executemany(
                    "INSERT INTO items (label, item_id, vector, metadata) VALUES (?, ?, ?, ?)",
                    [
                        (int(label), item_id, vec.tobytes(), meta)
                        for label, item_id, vec, meta in zip(labels, ids, vectors, rows_meta)
                    ],
                )
                self._set_setting("next_label", int(labels[-1]) + 1)
            # Committed: now the in-memory index (same thread lock, so readers see all or none).
            self._drop_labels(replaced)
            for label in replaced:
                del self._label_to_id[label]
            self._index.add_with_ids(vectors, labels)
            for label, item_id in zip(labels.tolist(), ids):
                self._label_to_id[label] = item_id
                self._id_to_label[item_id] = label
            self._changed()

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; durable before it returns.

        Raises:
            UnknownIdError: (a KeyError) if any id is not in the shard; nothing is removed then.
            ShardLockedError: another writer held the shard's write lock too long.

        Returns:
            Number of items removed (duplicates in `ids` count once).
        """
        ids = list(dict.fromkeys(_check_ids(ids)))
        with self._lock:
            with self._writing():
                unknown = [i for i in ids if i not in self._id_to_label]
                if unknown:
                    raise UnknownIdError(unknown)
                labels = [self._id_to_label[i] for i in ids]
                self._db.executemany("DELETE FROM items WHERE label = ?", [(x,) for x in labels])
            self._drop_labels(labels)
            for label, item_id in zip(labels, ids):
                del self._label_to_id[label]
                del self._id_to_label[item_id]
            self._changed()
            return len(ids)

    def install_template(self, template: bytes) -> None:
        """Use `template` (a serialised, trained, empty index from `train_template`) for an
        empty shard. `ShardedIndex.train` installs one template, trained once, in every shard."""
        with self._lock:
            with self._writing():
                self._install_template(template)
            self._changed()

    def save(self) -> None:
        """Write the FAISS snapshot atomically (compacting tombstones first when they exceed
        COMPACT_TOMBSTONE_FRACTION of the index). Items are already durable without it; saving
        only makes the next open faster."""
        with self._lock:
            self._catch_up()
            if self._tombstones() > COMPACT_TOMBSTONE_FRACTION * max(self._index.ntotal, 1):
                self._index = self._rebuild()
                self._gpu_index = None
            _atomic_write_index(self._index, self.shard_dir / SNAPSHOT_NAME)

    def compact(self) -> None:
        """Rebuild the in-memory index from the db (drops tombstones)."""
        with self._lock:
            self._catch_up()
            self._index = self._rebuild()
            self._gpu_index = None

    def close(self) -> None:
        """Close the db connection (the in-memory index is dropped with the object)."""
        self._db.close()

    # ---------------------------------------------------------------- reads
    def search(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, Any] | None = None,
        exclude: Mapping[str, Any] | None = None,
    ) -> SearchResult:
        """Top-k gallery items for each query, optionally among items whose metadata match.

        Args:
            queries: (Q, dim) float32 embeddings (L2-normalised for metric "ip").
            k: hits per query, >= 1. Fewer come back when the shard holds fewer (matching)
                items, or an approximate index finds fewer; no -1 padding is returned.
            where: metadata equality filter, e.g. {"camid": 3} or {"camid": [1, 2]} (a list
                is "any of"); an item must match every key. Flat shards return the exact
                top-k among matching items.
            exclude: drop items whose metadata match every key given, e.g. {"camid": 3}.

        Returns:
            scores (Q, k') float32, larger is better, rows sorted descending and -inf after each
            row's valid hits, k' = min(k, most hits of any row); ids: Q lists of item ids,
            row q holding its len(ids[q]) valid hits.
        """
        with self._lock:
            scores, labels = self._search_labels(queries, k, where, exclude)
            return scores, [[self._label_to_id[x] for x in row] for row in labels]

    def search_with_metadata(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, Any] | None = None,
        exclude: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, list[list[str]], list[list[dict[str, Any]]]]:
        """`search` plus each hit's metadata, read in the same call.

        An item another writer removes between the search and the metadata read is searched
        again after catching up (labels are never reused, so a label's row is always its own
        item's).

        Returns:
            (scores (Q, k'), ids Q lists, metadata Q lists of dicts), as `search`.
        """
        with self._lock:
            for attempt in range(3):
                scores, labels = self._search_labels(queries, k, where, exclude)
                found = self._rows_by_label([x for row in labels for x in row])
                if all(x in found for row in labels for x in row) or attempt == 2:
                    break
        rows_scores, rows_ids, rows_meta = [], [], []
        for row_scores, row in zip(scores, labels):
            keep = [j for j, x in enumerate(row) if x in found]
            rows_scores.append(row_scores[keep])
            rows_ids.append([found[row[j]][0] for j in keep])
            rows_meta.append([json.loads(found[row[j]][1]) for j in keep])
        return _pad_scores(rows_scores, len(queries)), rows_ids, rows_meta

    def get_metadata(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dicts of `ids`, in order. Raises UnknownIdError for ids not in the shard."""
        ids = _check_ids(ids)
        with self._lock:
            found: dict[str, str] = {}
            unique = list(dict.fromkeys(ids))
            for start in range(0, len(unique), _SQL_CHUNK):
                chunk = unique[start : start + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    self._db.execute(
                        f"SELECT item_id, metadata FROM items WHERE item_id IN ({marks})", chunk
                    )
                )
        unknown = [i for i in unique if i not in found]
        if unknown:
            raise UnknownIdError(unknown)
        return [json.loads(found[i]) for i in ids]

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of `ids`: (N, dim) float32. Raises UnknownIdError for unknown ids."""
        ids = _check_ids(ids)
        with self._lock:
            self._catch_up()
            unknown = [i for i in ids if i not in self._id_to_label]
            if unknown:
                raise UnknownIdError(unknown)
            labels = [self._id_to_label[i] for i in ids]
            by_label = dict(self._iter_vectors(labels))
        if not labels:
            return np.empty((0, self.dim), np.float32)
        return np.stack([by_label[x] for x in labels])

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set search-time accuracy/speed knobs; None leaves a knob unchanged.

        Args:
            nprobe: IVF lists visited per query (IVF index types).
            ef_search: HNSW candidate list size (HNSW index types).
        """
        params = {"nprobe": nprobe, "efSearch": ef_search}
        with self._lock:
            for name, value in params.items():
                if value is None:
                    continue
                if int(value) < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
                try:
                    faiss.ParameterSpace().set_index_parameter(self._index, name, int(value))
                except RuntimeError:
                    raise ValueError(
                        f"index_type {self.index_type!r} has no search parameter {name!r}"
                    ) from None
                self._search_params[name] = int(value)
            self._gpu_index = None

    def stats(self) -> dict[str, Any]:
        """Counts and settings of this shard."""
        with self._lock:
            self._catch_up()
            return {
                "shard_id": self.shard_id,
                "count": len(self._label_to_id),
                "ntotal": int(self._index.ntotal),
                "tombstones": self._tombstones(),
                "is_trained": bool(self._index.is_trained),
                "search_params": dict(self._search_params),
                "gpu": self._use_gpu,
            }

    def refresh(self) -> None:
        """Re-read the db now. Every read and write already catches up with other writers'
        commits by itself (a cheap `PRAGMA data_version` check); this forces a full re-read."""
        with self._lock:
            self._version = -1
            self._catch_up()

    # ---------------------------------------------------------------- internals
    def _data_version(self) -> int:
        # Changes whenever another connection (another process, another replica) commits;
        # this connection's own commits leave it unchanged.
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _catch_up(self) -> None:
        """Re-read the db when another connection committed since we last looked.
        The caller holds `self._lock`, and no transaction is open."""
        version = self._data_version()
        if version == self._version:
            return
        self._db.execute("BEGIN")  # one snapshot for the item map and the vectors
        try:
            self._reload()
        finally:
            self._db.execute("COMMIT")
        self._version = version

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction, serialised with every other writer of this shard, in any
        process, by SQLite's write lock (BEGIN IMMEDIATE waits up to WRITE_LOCK_TIMEOUT_S).
        Holding it, the shard first catches up with the others' commits, so upserts, removes
        and new labels are decided on the current state. Commits on success; on an error
        rolls back and marks the in-memory state for a full re-read."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            raise ShardLockedError(
                f"{self.shard_dir / DB_NAME}: another writer held the write lock for more "
                f"than {self._lock_timeout_s:g} s; retry the write"
            ) from None
        try:
            version = self._data_version()
            if version != self._version:
                self._reload()
                self._version = version
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._version = -1  # in-memory state may be half-changed: re-read next time
            raise

    def _reload(self) -> None:
        """Bring the item map and the FAISS index up to the db (inside a transaction)."""
        self._label_to_id = dict(self._db.execute("SELECT label, item_id FROM items"))
        self._id_to_label = {item_id: label for label, item_id in self._label_to_id.items()}
        template = self._get_setting("template")
        if template != self._template and self._index.ntotal == 0:
            self._template = template
            self._index = _deserialize(template)
        self._reconcile(self._index)
        self._apply_search_params(self._index)
        self._changed()

    def _changed(self) -> None:
        self._gpu_index = None
        self._filter_cache.clear()

    def _tombstones(self) -> int:
        return int(self._index.ntotal) - len(self._label_to_id)

    def _install_template(self, template: bytes) -> None:
        """Inside a write transaction: the trained empty index for an empty shard."""
        if self._index.ntotal > 0:
            raise ValueError(f"shard {self.shard_id} holds vectors; cannot replace its index")
        index = _deserialize(template)
        if index.d != self.dim:
            raise ValueError(f"template dim {index.d} != shard {self.shard_id} dim {self.dim}")
        self._set_setting("template", template)
        self._template = template
        self._index = index
        self._apply_search_params(self._index)

    def _get_setting(self, key: str) -> Any:
        return self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0]

    def _set_setting(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def _drop_labels(self, labels: Sequence[int]) -> None:
        """Remove labels from the FAISS index, or leave them as tombstones if it cannot."""
        _remove_or_tombstone(self._index, labels)

    def _search_labels(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, Any] | None,
        exclude: Mapping[str, Any] | None,
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Caught-up search: scores (Q, k') as `search`, labels Q lists (caller holds lock)."""
        queries = _as_matrix(queries, self.dim, "queries")
        _check_k(k)
        where = check_filter(where, "where")
        exclude = check_filter(exclude, "exclude")
        self._catch_up()
        no_hits = np.empty((len(queries), 0), np.float32), [[] for _ in queries]
        if not self._label_to_id or not len(queries):
            return no_hits
        selector, allowed = self._selector(where, exclude)
        if allowed == 0:
            return no_hits
        # Tombstones can fill the top of a row, so fetch past them and filter.
        fetch = min(k + self._tombstones(), int(self._index.ntotal))
        if where:
            fetch = min(k, allowed)  # the selector admits live matching labels only
        if selector is None:
            distances, labels = self._searcher(fetch).search(queries, fetch)  # (Q, fetch)
        else:
            params = self._filtered_params(selector[0])
            distances, labels = self._index.search(queries, fetch, params=params)
        scores = -distances if self.metric == "l2" else distances
        rows_scores, rows_labels = [], []
        for row_scores, row_labels in zip(scores, labels.tolist()):
            keep = [j for j, x in enumerate(row_labels) if x in self._label_to_id][:k]
            rows_scores.append(row_scores[keep])
            rows_labels.append([row_labels[j] for j in keep])
        return _pad_scores(rows_scores, len(queries)), rows_labels

    def _selector(
        self, where: dict[str, list[Any]], exclude: dict[str, list[Any]]
    ) -> tuple[tuple[faiss.IDSelector, ...] | None, int]:
        """FAISS selector for a filter (with the objects it points to, kept alive by the
        caller) and how many live items it admits (-1: not counted, exclude only)."""
        if not where and not exclude:
            return None, -1
        excluded = self._matching_labels(exclude) if exclude else np.empty(0, np.int64)
        if where:
            allowed = np.setdiff1d(self._matching_labels(where), excluded, assume_unique=True)
            if not len(allowed):
                return None, 0
            return (faiss.IDSelectorBatch(allowed),), len(allowed)
        inner = faiss.IDSelectorBatch(excluded)
        return (faiss.IDSelectorNot(inner), inner), -1

    def _matching_labels(self, conditions: dict[str, list[Any]]) -> np.ndarray:
        """Sorted int64 labels of items whose metadata match every condition (key: any of
        the values), from the db (JSON1 `json_each`, so any key works); cached until the
        next write."""
        key = json.dumps(conditions, sort_keys=True)
        cached = self._filter_cache.get(key)
        if cached is not None:
            return cached
        result: np.ndarray | None = None
        for name, values in conditions.items():
            clauses, params = [], [name]
            for value in values:
                if isinstance(value, bool) or value is None:
                    clauses.append("j.type = ?")
                    params.append({True: "true", False: "false", None: "null"}[value])
                elif isinstance(value, str):
                    clauses.append("(j.type = 'text' AND j.atom = ?)")
                    params.append(value)
                else:
                    clauses.append("(j.type IN ('integer', 'real') AND j.atom = ?)")
                    params.append(value)
            query = (
                "SELECT DISTINCT items.label FROM items, json_each(items.metadata) AS j "
                f"WHERE j.key = ? AND ({' OR '.join(clauses)})"
            )
            labels = np.fromiter(
                (row[0] for row in self._db.execute(query, params)), dtype=np.int64
            )
            labels = np.intersect1d(labels, result) if result is not None else np.unique(labels)
            # Another writer's newer commit may show here before our catch-up; keep only
            # what the in-memory index holds.
            result = labels
        assert result is not None
        live = np.fromiter(self._label_to_id, dtype=np.int64, count=len(self._label_to_id))
        result = np.intersect1d(result, live)
        self._filter_cache[key] = result
        return result

    def _filtered_params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        """Search parameters carrying `selector` and the shard's own nprobe / efSearch."""
        index = faiss.downcast_index(self._index)
        if isinstance(index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=int(index.nprobe))
        inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
        if isinstance(inner, faiss.IndexFlat):
            return faiss.SearchParameters(sel=selector)
        raise ValueError(
            f"index_type {self.index_type!r} does not support filtered search (where/exclude); "
            "use Flat, IVF or HNSW"
        )

    def _rows_by_label(self, labels: Sequence[int]) -> dict[int, tuple[str, str]]:
        """label -> (item_id, metadata JSON) for the labels still in the db."""
        found: dict[int, tuple[str, str]] = {}
        unique = list(dict.fromkeys(labels))
        for start in range(0, len(unique), _SQL_CHUNK):
            chunk = unique[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT label, item_id, metadata FROM items WHERE label IN ({marks})"
            for label, item_id, meta in self._db.execute(query, chunk):
                found[label] = (item_id, meta)
        return found

    def _iter_vectors(self, labels: Sequence[int] | None) -> Iterator[tuple[int, np.ndarray]]:
        """(label, (dim,) float32 vector) for `labels`, or for every item in label order."""
        if labels is None:
            cursor = self._db.execute("SELECT label, vector FROM items ORDER BY label")
            for label, blob in cursor:
                yield label, np.frombuffer(blob, dtype=np.float32)
            return
        labels = list(labels)
        for start in range(0, len(labels), _SQL_CHUNK):
            chunk = labels[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT label, vector FROM items WHERE label IN ({marks}) ORDER BY label"
            for label, blob in self._db.execute(query, chunk):
                yield label, np.frombuffer(blob, dtype=np.float32)

    def _add_from_db(self, index: faiss.Index, labels: Sequence[int] | None) -> int:
        """Add stored vectors (all when `labels` is None) to `index` in batches."""
        added = 0
        batch: list[tuple[int, np.ndarray]] = []
        for item in self._iter_vectors(labels):
            batch.append(item)
            if len(batch) == 65_536:
                added += _add_batch(index, batch)
                batch = []
        return added + _add_batch(index, batch)

    def _rebuild(self) -> faiss.Index:
        index = _deserialize(self._template)
        if self._label_to_id and not index.is_trained:
            raise ValueError(f"shard {self.shard_id}: db holds items but no trained index")
        self._add_from_db(index, None)
        self._apply_search_params(index)
        return index

    def _load_snapshot(self) -> faiss.Index:
        """The snapshot brought up to date with the db, or an index rebuilt from the db."""
        path = self.shard_dir / SNAPSHOT_NAME
        if not path.exists():
            if self._label_to_id:
                logger.warning("%s missing; rebuilding shard from the db", path)
            return self._rebuild()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:  # missing, truncated or corrupt snapshot
            logger.warning("%s unreadable (%s); rebuilding shard from the db", path, err)
            return self._rebuild()
        template = _deserialize(self._template)
        if (
            type(index) is not type(template)
            or index.d != self.dim
            or (template.is_trained and not index.is_trained)
        ):
            logger.warning("%s does not match the shard db; rebuilding from the db", path)
            return self._rebuild()
        self._reconcile(index)
        self._apply_search_params(index)
        return index

    def _reconcile(self, index: faiss.Index) -> None:
        """Replay the db onto a snapshot: drop labels removed since, add labels added since."""
        in_index = set(_labels_in(index).tolist())
        stale = sorted(in_index.difference(self._label_to_id))
        missing = sorted(set(self._label_to_id).difference(in_index))
        _remove_or_tombstone(index, stale)
        if missing:
            self._add_from_db(index, missing)
        if stale or missing:
            logger.info(
                "shard %d: snapshot was behind the db by %d adds and %d removes; replayed",
                self.shard_id,
                len(missing),
                len(stale),
            )

    def _apply_search_params(self, index: faiss.Index) -> None:
        for name, value in self._search_params.items():
            faiss.ParameterSpace().set_index_parameter(index, name, value)

    def _searcher(self, k: int) -> faiss.Index:
        """GPU copy of the index when GPUs are present and the index type supports it."""
        if not self._use_gpu or k > GPU_MAX_K:
            return self._index
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
                for name, value in self._search_params.items():
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, name, value)
            except (RuntimeError, AttributeError) as err:  # e.g. HNSW has no GPU version
                logger.info("shard %d searches on CPU: %s", self.shard_id, err)
                self._use_gpu = False
                return self._index
        return self._gpu_index


def train_template(
    index_type: str,
    metric: str,
    vectors: np.ndarray,
    max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
    seed: int = 0,
) -> bytes:
    """Build an empty index (see `_new_index`) and train it (if it needs training).

    Args:
        index_type: FAISS factory string ("Flat", "IVF1024,PQ32", "HNSW32", ...). A PQ spec
            trains polysemous codes unless it ends in "np" ("IVF1024,PQ32np"), which is slow.
        metric: "ip" or "l2".
        vectors: (N, dim) float32 training vectors; a seeded random sample of at most
            `max_train_vectors` of them is used.

    Returns:
        The serialised empty index, ready for `Shard.install_template`.

    Raises:
        ValueError: if N is too small to train `index_type` (names the count that is needed).
    """
    index = _new_index(index_type, metric, vectors.shape[1])
    if not index.is_trained:
        needed = _min_training_vectors(index)
        if len(vectors) < needed:
            raise ValueError(
                f"index_type {index_type!r} needs at least {needed} training vectors, got "
                f"{len(vectors)}; add more vectors in the first batch, call train() with a "
                "larger sample, or use a smaller index (fewer IVF lists, fewer PQ bits)"
            )
        if len(vectors) > max_train_vectors:
            rng = np.random.default_rng(seed)
            vectors = vectors[np.sort(rng.choice(len(vectors), max_train_vectors, replace=False))]
        try:
            index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        except RuntimeError as err:
            raise ValueError(
                f"cannot train index_type {index_type!r} on {len(vectors)} vectors: {err}"
            ) from err
    return faiss.serialize_index(index).tobytes()


def shard_path(index_dir: str | os.PathLike, shard_id: int) -> Path:
    """Directory of shard `shard_id` inside an index directory (`index_dir/shard_<id>`)."""
    return Path(index_dir) / SHARD_DIR_FORMAT.format(shard_id)


def open_shard(
    index_dir: str | os.PathLike,
    shard_id: int,
    use_gpu: bool | None = None,
    lock_timeout_s: float | None = None,
) -> Shard:
    """Open one shard of a sharded index (what a Serve shard deployment calls).

    Args:
        index_dir: directory made by `ShardedIndex.create`.
        shard_id: 0 <= shard_id < num_shards.
        use_gpu: search on all GPUs (Flat/IVF); None means "when faiss sees a GPU".
        lock_timeout_s: how long a write waits for another writer's lock before
            ShardLockedError; None = WRITE_LOCK_TIMEOUT_S.
    """
    manifest = read_manifest(index_dir)
    if not 0 <= shard_id < manifest["num_shards"]:
        raise ValueError(
            f"shard_id {shard_id} out of range for {index_dir} ({manifest['num_shards']} shards)"
        )
    shard = Shard(shard_path(index_dir, shard_id), use_gpu=use_gpu, lock_timeout_s=lock_timeout_s)
    for field in ("dim", "metric", "index_type"):
        if getattr(shard, field) != manifest[field]:
            shard.close()
            raise ValueError(
                f"{shard.shard_dir / DB_NAME}: {field} {getattr(shard, field)!r} does not match "
                f"{MANIFEST_NAME} ({manifest[field]!r})"
            )
    return shard


class ShardedIndex:
    """All shards of a gallery index, with writes routed by `shard_of` and merged search.

    Build with `ShardedIndex.create(...)`, reopen with `ShardedIndex.open(index_dir)`.
    """

    def __init__(self, index_dir: Path, manifest: dict[str, Any], shards: list[Shard]):
        self.index_dir = index_dir
        self.manifest = manifest
        self.shards = shards

    @classmethod
    def create(
        cls,
        index_dir: str | os.PathLike,
        dim: int,
        num_shards: int,
        index_type: str = "Flat",
        metric: str = "ip",
        extra: Mapping[str, Any] | None = None,
        use_gpu: bool | None = None,
    ) -> ShardedIndex:
        """Create an empty index on disk.

        Args:
            index_dir: new or empty directory.
            dim: embedding dimension D.
            num_shards: number of shards (>= 1); fixed for the life of the index.
            index_type: FAISS factory string: "Flat", "IVF1024,PQ32", "HNSW32", "IVF256,Flat"...
            metric: "ip" (inner product on L2-normalised vectors = cosine) or "l2".
            extra: JSON-serialisable user fields stored in the manifest (checkpoint path, ...).
            use_gpu: see `open_shard`.
        """
        index_dir = Path(index_dir)
        if dim < 1 or num_shards < 1:
            raise ValueError(f"dim and num_shards must be >= 1, got {dim} and {num_shards}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if (index_dir / MANIFEST_NAME).exists():
            raise FileExistsError(f"an index already exists at {index_dir}")
        template = faiss.serialize_index(_new_index(index_type, metric, dim)).tobytes()
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": dim,
            "metric": metric,
            "index_type": index_type,
            "num_shards": num_shards,
            "shard_hash": "crc32(utf-8 id) % num_shards",
            "counts": [0] * num_shards,
            "extra": dict(extra or {}),
        }
        json.dumps(manifest)  # fail before writing anything if `extra` is not JSON-serialisable
        for shard_id in range(num_shards):
            shard_dir = shard_path(index_dir, shard_id)
            shard_dir.mkdir(parents=True, exist_ok=True)
            db = _connect(shard_dir / DB_NAME)
            with _transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                    [
                        ("format_version", FORMAT_VERSION),
                        ("shard_id", shard_id),
                        ("num_shards", num_shards),
                        ("dim", dim),
                        ("metric", metric),
                        ("index_type", index_type),
                        ("next_label", 0),
                        ("template", template),
                    ],
                )
            db.close()
        # The manifest goes last: a directory without one is an unfinished create.
        _atomic_write_bytes(index_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
        return cls.open(index_dir, use_gpu=use_gpu)

    @classmethod
    def open(cls, index_dir: str | os.PathLike, use_gpu: bool | None = None) -> ShardedIndex:
        """Open every shard of an existing index (replaying the db onto stale snapshots)."""
        manifest = read_manifest(index_dir)
        shards = [open_shard(index_dir, i, use_gpu) for i in range(manifest["num_shards"])]
        return cls(Path(index_dir), manifest, shards)

    # ---------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def index_type(self) -> str:
        return str(self.manifest["index_type"])

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest["extra"]

    @property
    def count(self) -> int:
        return sum(shard.count for shard in self.shards)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self.shards[self._shard_of(item_id)]

    @property
    def is_trained(self) -> bool:
        return all(shard.is_trained for shard in self.shards)

    # ---------------------------------------------------------------- writes
    def train(
        self,
        vectors: np.ndarray,
        max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
        seed: int = 0,
    ) -> None:
        """Train the index type once on a sample of `vectors` (N, dim) and give every shard a
        copy. `add` calls this on its first batch when needed; call it yourself to train on a
        sample and then add in smaller batches."""
        vectors = _as_matrix(vectors, self.dim, "vectors")
        if any(shard.count for shard in self.shards):
            raise ValueError(f"{self.index_dir} already holds vectors; train before the first add")
        template = train_template(self.index_type, self.metric, vectors, max_train_vectors, seed)
        for shard in self.shards:
            shard.install_template(template)

    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Add or replace items (upsert: an existing id gets the new vector and metadata).

        Each shard's part is durable on disk when this returns. On an untrained IVF/PQ index
        the first call trains on (a sample of) `vectors`.

        Args:
            ids: N unique string ids.
            vectors: (N, dim) float32, L2-normalised for metric "ip".
            metadata: N JSON-serialisable dicts; None stores {}.
        """
        ids, vectors, _ = _check_items(ids, vectors, metadata, self.dim, self.metric)
        metadata = [{}] * len(ids) if metadata is None else list(metadata)
        if not self.is_trained and ids:
            self.train(vectors)
        for shard_id, rows in self._group_by_shard(ids).items():
            self.shards[shard_id].add(
                [ids[r] for r in rows], vectors[rows], [metadata[r] for r in rows]
            )

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id. Raises UnknownIdError (a KeyError) naming unknown ids, before
        removing anything. Returns the number removed."""
        ids = list(dict.fromkeys(_check_ids(ids)))
        unknown = [i for i in ids if i not in self]
        if unknown:
            raise UnknownIdError(unknown)
        groups = self._group_by_shard(ids)
        return sum(self.shards[s].remove([ids[r] for r in rows]) for s, rows in groups.items())

    def save(self) -> None:
        """Snapshot every shard's FAISS index and update the manifest counts (atomically)."""
        for shard in self.shards:
            shard.save()
        self.manifest["counts"] = [shard.count for shard in self.shards]
        body = json.dumps(self.manifest, indent=2).encode()
        _atomic_write_bytes(self.index_dir / MANIFEST_NAME, body)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reads
    def search(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, Any] | None = None,
        exclude: Mapping[str, Any] | None = None,
    ) -> SearchResult:
        """Global top-k over all shards: each shard's top-k merged by `merge_topk`.

        Args:
            queries: (Q, dim) float32.
            k: hits per query, >= 1.
            where, exclude: metadata filters (see `Shard.search`); on Flat shards the result
                is the exact top-k among matching items.

        Returns:
            As `Shard.search`: scores (Q, k') float32 descending (-inf after each row's hits),
            ids Q lists of item ids.
        """
        queries = _as_matrix(queries, self.dim, "queries")
        _check_k(k)
        parts = [shard.search(queries, k, where, exclude) for shard in self.shards]
        return merge_topk(parts, k)

    def search_with_metadata(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, Any] | None = None,
        exclude: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, list[list[str]], list[list[dict[str, Any]]]]:
        """`search` plus the metadata of every hit: (scores (Q, k'), ids, metadata)."""
        queries = _as_matrix(queries, self.dim, "queries")
        _check_k(k)
        parts = [shard.search_with_metadata(queries, k, where, exclude) for shard in self.shards]
        scores, ids = merge_topk([(p[0], p[1]) for p in parts], k)
        metadata = []
        for q, row in enumerate(ids):
            by_id = {i: m for p in parts for i, m in zip(p[1][q], p[2][q])}
            metadata.append([by_id[i] for i in row])
        return scores, ids, metadata

    def get_metadata(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dicts of `ids`, in order. Raises UnknownIdError for unknown ids."""
        ids = _check_ids(ids)
        unknown = [i for i in ids if i not in self]
        if unknown:
            raise UnknownIdError(unknown)
        out: list[dict[str, Any]] = [{} for _ in ids]
        for shard_id, rows in self._group_by_shard(ids).items():
            found = self.shards[shard_id].get_metadata([ids[r] for r in rows])
            for r, meta in zip(rows, found):
                out[r] = meta
        return out

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """`Shard.set_search_params` on every shard."""
        for shard in self.shards:
            shard.set_search_params(nprobe=nprobe, ef_search=ef_search)

    def stats(self) -> dict[str, Any]:
        """Index settings, live counts (total and per shard), tombstones, search params."""
        return {
            "index_dir": str(self.index_dir),
            "dim": self.dim,
            "metric": self.metric,
            "index_type": self.index_type,
            "num_shards": self.num_shards,
            "count": self.count,
            "is_trained": self.is_trained,
            "shards": [shard.stats() for shard in self.shards],
            "extra": self.extra,
        }

    def _shard_of(self, item_id: str) -> int:
        return shard_of(item_id, self.num_shards)

    def _group_by_shard(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """Row numbers of `ids` grouped by shard."""
        groups: dict[int, list[int]] = {}
        for row, item_id in enumerate(ids):
            groups.setdefault(self._shard_of(item_id), []).append(row)
        return groups


# -------------------------------------------------------------------- helpers
def _new_index(index_type: str, metric: str, dim: int) -> faiss.Index:
    """Empty index that stores int64 labels and (except HNSW) supports remove_ids.

    IVF indexes keep labels in their inverted lists natively. Every other type is wrapped in
    IndexIDMap2; IVF must not be, because IVF's remove_ids reorders its lists and IndexIDMap
    then fails an assertion ('j == index->ntotal' in IndexIDMap.cpp).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    spec = index_type.strip()
    if spec.upper().startswith(("IDMAP,", "IDMAP2,")):
        raise ValueError(f"index_type {index_type!r}: leave out the IDMap prefix, it is added")
    try:
        index = faiss.index_factory(dim, spec, METRICS[metric])
    except RuntimeError as err:
        raise ValueError(f"index_type {index_type!r} is not a FAISS factory string: {err}") from err
    if _find_ivf(index) is not None:
        return index
    return faiss.index_factory(dim, f"IDMap2,{spec}", METRICS[metric])


def _find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _labels_in(index: faiss.Index) -> np.ndarray:
    """All int64 labels stored in an index from `_new_index` (tombstones included)."""
    ivf = _find_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map)
    lists = ivf.invlists
    sizes = [lists.list_size(i) for i in range(ivf.nlist)]
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), size).copy() for i, size in enumerate(sizes) if size
    ]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _min_training_vectors(index: faiss.Index) -> int:
    """Fewest training vectors FAISS accepts: one per IVF list, one per PQ centroid."""
    ivf = _find_ivf(index)
    if ivf is not None:
        return max(int(ivf.nlist), int(ivf.pq.ksub) if hasattr(ivf, "pq") else 1)
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return int(inner.pq.ksub) if hasattr(inner, "pq") else 1


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _as_matrix(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """`x` as a C-contiguous (N, dim) float32 array of finite values."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"{name} have dimension {arr.shape[1]}, the index expects {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} contain NaN or inf (first at row {row})")
    return arr


def _check_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise TypeError(f"ids must be a sequence of strings, got the string {ids!r}")
    ids = list(ids)
    for pos, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id:
            raise TypeError(f"ids must be non-empty strings, got {item_id!r} at position {pos}")
    return ids


def _check_items(
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Sequence[Mapping[str, Any]] | None,
    dim: int,
    metric: str,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Validated ids, (N, dim) float32 vectors and metadata as JSON strings."""
    ids = _check_ids(ids)
    vectors = _as_matrix(vectors, dim, "vectors")
    if len(ids) != len(vectors):
        raise ValueError(f"got {len(ids)} ids but {len(vectors)} vectors")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate id {dup!r} in one add() call")
    if metric == "ip" and len(vectors):
        norms = np.linalg.norm(vectors, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
        if bad.size:
            raise ValueError(
                f"vectors must be L2-normalised for metric 'ip': id {ids[bad[0]]!r} has norm "
                f"{norms[bad[0]]:.4f} ({bad.size} such rows)"
            )
    if metadata is None:
        return ids, vectors, ["{}"] * len(ids)
    metadata = list(metadata)
    if len(metadata) != len(ids):
        raise ValueError(f"got {len(ids)} ids but {len(metadata)} metadata dicts")
    rows = []
    for item_id, meta in zip(ids, metadata):
        if not isinstance(meta, Mapping):
            raise TypeError(f"metadata of id {item_id!r} must be a dict, got {type(meta).__name__}")
        try:
            rows.append(json.dumps(dict(meta), allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata of id {item_id!r} is not JSON-serialisable: {err}") from err
    return ids, vectors, rows


def _remove_or_tombstone(index: faiss.Index, labels: Sequence[int]) -> None:
    """index.remove_ids(labels), or nothing where the index type cannot remove (HNSW): the
    labels are gone from the db and the shard's label map, so search skips them (tombstones)."""
    if not labels:
        return
    try:
        index.remove_ids(np.asarray(labels, dtype=np.int64))
    except RuntimeError as err:
        if "not implemented" not in str(err):
            raise


def _add_batch(index: faiss.Index, batch: list[tuple[int, np.ndarray]]) -> int:
    if not batch:
        return 0
    labels = np.fromiter((label for label, _ in batch), dtype=np.int64, count=len(batch))
    index.add_with_ids(np.stack([vec for _, vec in batch]), labels)
    return len(batch)


def _deserialize(blob: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))


def _gpu_available() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _pad_scores(rows: Sequence[np.ndarray], num_queries: int) -> np.ndarray:
    """Ragged per-row scores as (Q, longest row) float32, -inf after each row's hits."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((num_queries, width), -np.inf, dtype=np.float32)
    for q, row in enumerate(rows):
        out[q, : len(row)] = row
    return out


def _connect(path: Path, timeout_s: float | None = None) -> sqlite3.Connection:
    """Shard db with a WAL journal fsynced on every commit (a write is durable when acked).

    Autocommit mode (isolation_level None): `Shard` opens its transactions itself, BEGIN
    IMMEDIATE for writes (SQLite's cross-process write lock) and BEGIN for consistent reads.
    """
    # check_same_thread=False: Shard serialises access with its own lock.
    timeout_s = WRITE_LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value NOT NULL)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS items ("
        " label INTEGER PRIMARY KEY,"  # int64 id inside FAISS, never reused
        " item_id TEXT NOT NULL UNIQUE,"
        " vector BLOB NOT NULL,"  # (dim,) float32, native byte order
        " metadata TEXT NOT NULL)"  # JSON object
    )
    return db


@contextmanager
def _transaction(db: sqlite3.Connection, mode: str = "") -> Iterator[None]:
    """BEGIN [mode] ... COMMIT on an autocommit connection (ROLLBACK on error)."""
    db.execute(f"BEGIN {mode}")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temp file and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_index(index: faiss.Index, path: Path) -> None:
    """faiss.write_index to a fsynced temp file, then os.replace (no half-written snapshot)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
