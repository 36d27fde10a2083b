"""Retrieval service on Ray Serve: batched embedding, one deployment per index shard, merged top-k.

    HTTP --> RetrievalIngress (FastAPI: auth, body limit, parse, decode, fan-out, merge)
               |--> Embedder (@serve.batch, GPU when present): image -> (D,) unit vector
               |--> shard_0 .. shard_{n-1} (IndexShard, each opens only its own shard,
               |        each may have replicas), queried in parallel; concurrent queries are
               |        coalesced (@serve.batch) into one FAISS search per shard per batch
               '--> merge_topk --> {"results": [{"id", "score", "metadata"}, ...]}

    python -m serve_apps run serve_apps/retrieval.yaml
    serve run serve_apps.retrieval:build_app index_dir=~/reid-platform/index

Writes (POST /v1/gallery, DELETE /v1/gallery/{id}) go to the shard that owns the id (the
index's `shard_of` hash) and are answered only after that shard's SQLite commit is fsynced,
so a restarted application or a replaced replica serves the same gallery. A multi-item POST is
validated whole (ids, metadata, every image decoded and embedded) before any write; if a shard
then fails, the answer (503) lists exactly which ids were written. Replicas of one shard, and
any other writer of the index (a `build_index` re-run), share its files: the index serialises
writers and every read catches up with the others' commits (`reid_platform.retrieval.index`).

The app sizes its CPU requests to the cluster (`plan_cpus`): shards and the ingress are light,
the Embedder gets what is left; an app the cluster cannot hold is refused at build time with the
resources asked and available. `/healthz` answers 503 until every deployment answers, naming
the ones that do not.
"""

import asyncio
import base64
import binascii
import ipaddress
import json
import math
import os
import re
import secrets
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import fastapi_offline
import numpy as np
import ray
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from reid_platform.retrieval.index import (
    WRITE_LOCK_TIMEOUT_S,
    ShardLockedError,
    UnknownIdError,
    check_filter,
    merge_topk,
    open_shard,
    read_manifest,
    shard_of,
)
from reid_platform.runtime import gpus_per_actor, init_ray

TOKEN_ENV = "REID_SERVE_TOKEN"
DEFAULT_K = 10
SNAPSHOT_EVERY = 1000  # items written between FAISS snapshots of a shard (the db is the truth)
MAX_ID_LENGTH = 1024
MAX_LABEL_KEY_LENGTH = 256
DEFAULT_MAX_IMAGES = 32  # images per /v1/search request
DEFAULT_MAX_BOXES = 128  # boxes per /v1/search request
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005
HEALTH_TIMEOUT_S = 3.0  # a deployment that does not answer /healthz's ping in this is "not ready"
# CPU sizing (plan_cpus): the light deployments' default and their share of the cluster.
LIGHT_CPUS = 0.1
LIGHT_SHARE = 0.25
MIN_EMBEDDER_CPUS = 0.25
_K_TEXT = re.compile(r"[+-]?[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is True


class RetrievalArgs(BaseModel):
    """Arguments of `build_app`: `serve run ... key=value` or the `args:` of the YAML."""

    model_config = ConfigDict(extra="forbid")

    index_dir: str = Field(description="index directory written by jobs/build_index.py")
    checkpoint: str = Field("", description="model checkpoint; empty: the index manifest's")
    model_uri: str = Field(
        "",
        description="a registered model to serve instead: models:/NAME@ALIAS, models:/NAME/N "
        "or runs:/RUN/model (an alias is resolved to its version once, when the app is built)",
    )
    runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="how the Embedder runs the model: PyTorch, or its ONNX export under ONNX "
        "Runtime (exported beside the checkpoint at build time when there is none)",
    )
    tta: Literal["auto", "none", "flip"] = Field(
        "auto",
        description="flip: average each embedding with its mirror image's; auto: as the index "
        "was built (manifest extra.tta)",
    )
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024, description="Embedder batch (user_config)"
    )
    batch_wait_timeout_s: float = Field(
        DEFAULT_BATCH_WAIT_S, ge=0.0, le=10.0, description="Embedder batch wait (user_config)"
    )
    shard_max_batch_size: int = Field(
        64, ge=1, le=4096, description="queries coalesced into one FAISS search per shard"
    )
    shard_batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, le=10.0, description="how long a shard waits for more queries"
    )
    max_body_bytes: int = Field(10 * 2**20, ge=1024, description="larger bodies get 413")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="images declaring more pixels (w x h) get 400"
    )
    max_k: int = Field(100, ge=1, description="largest k a search may ask for")
    max_images: int = Field(
        DEFAULT_MAX_IMAGES, ge=1, description="images one /v1/search may send (more get 422)"
    )
    max_boxes: int = Field(
        DEFAULT_MAX_BOXES, ge=1, description="boxes one /v1/search may send (more get 422)"
    )
    auth_token: str = Field(
        default_factory=lambda: os.environ.get(TOKEN_ENV, ""),
        repr=False,
        description=f"bearer token; default: ${TOKEN_ENV}; empty: no auth",
    )
    http_host: str = Field(
        "127.0.0.1",
        description="Serve's HTTP host, applied when this builder starts Serve (`serve run "
        "serve_apps.retrieval:build_app ...`); a YAML config sets http_options instead",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP port, as http_host")
    docs_public: bool = Field(
        True, description="/docs and /openapi.json without the token (False: token required)"
    )
    metadata_path: Literal["relative", "absolute", "omit"] = Field(
        "relative",
        description="metadata.path in results: relative to the gallery root (paths outside "
        "it are left out), as stored, or never",
    )
    write_timeout_s: float = Field(
        WRITE_LOCK_TIMEOUT_S, gt=0.0, description="a shard write waits this long for the lock"
    )
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard deployment")
    embedder_replicas: int = Field(1, ge=1)
    num_gpus: float | None = Field(
        None, ge=0.0, description="GPUs per Embedder; None: 1 if the cluster has"
    )
    shard_num_gpus: float = Field(0.0, ge=0.0, description="GPUs per shard replica (faiss-gpu)")
    embedder_num_cpus: float | None = Field(
        None, ge=0.0, description="CPUs per Embedder; None: what the light deployments leave"
    )
    shard_num_cpus: float | None = Field(None, ge=0.0, description=f"None: {LIGHT_CPUS} or less")
    ingress_num_cpus: float | None = Field(None, ge=0.0, description=f"None: {LIGHT_CPUS} or less")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched per query")
    ef_search: int | None = Field(None, ge=1, description="HNSW efSearch")


# ---- loopback for every replica -------------------------------------------------------


def keep_replica_grpc_on_loopback() -> None:
    """Bind this replica's inter-deployment gRPC server to 127.0.0.1 when the node is loopback.

    Ray Serve 2.60 starts that server in every replica on all interfaces ("[::]:0", no setting),
    right after the deployment's constructor returns; every other Ray and Serve listener follows
    the node address. On a node whose address is loopback (the platform's local Ray) callers
    reach the replica at 127.0.0.1 anyway, so binding there loses nothing. Each deployment's
    constructor calls this; on a cluster node (an outward address) it does nothing.
    """
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback_only", False):
        return
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return

    def bind_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    bind_loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_loopback


# ---- fitting the app to the cluster ------------------------------------------------------


class ResourceFitError(ValueError):
    """The cluster cannot hold the app; the message names the resources asked and available."""


def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100  # Ray accounts resources in 1e-4 units


def plan_cpus(
    num_shards: int,
    shard_replicas: int,
    embedder_replicas: int,
    cluster_cpus: float,
    node_cpus: float | None = None,
    embedder: float | None = None,
    shard: float | None = None,
    ingress: float | None = None,
) -> dict[str, float]:
    """CPUs per replica of each deployment, sized to the cluster.

    Shard replicas and the ingress are light: LIGHT_CPUS each, or less so that together they
    ask for at most LIGHT_SHARE of the cluster. The Embedder gets what they leave (it runs the
    model), divided among its replicas and at most one node's CPUs. Explicit values are kept.

    Args:
        num_shards, shard_replicas, embedder_replicas: the app's shape.
        cluster_cpus: the cluster's CPUs (all nodes).
        node_cpus: the largest node's CPUs (a replica must fit on one); None = cluster_cpus.
        embedder, shard, ingress: explicit CPUs per replica, or None to size.

    Returns:
        {"embedder": cpus, "shard": cpus, "ingress": cpus}, per replica.

    Raises:
        ResourceFitError: the app cannot fit, naming what it asks and what there is.
    """
    node_cpus = cluster_cpus if node_cpus is None else node_cpus
    num_light = num_shards * shard_replicas + 1
    default_light = max(0.01, _floor2(min(LIGHT_CPUS, LIGHT_SHARE * cluster_cpus / num_light)))
    shard = default_light if shard is None else shard
    ingress = default_light if ingress is None else ingress
    light_total = shard * num_shards * shard_replicas + ingress
    sized = embedder is None
    if sized:
        embedder = _floor2(min((cluster_cpus - light_total) / embedder_replicas, node_cpus))
    asked = light_total + embedder * embedder_replicas
    shape = (
        f"Embedder {embedder_replicas} x {embedder:g}, {num_shards} shards x {shard_replicas} "
        f"replicas x {shard:g}, ingress {ingress:g}"
    )
    if sized and embedder < MIN_EMBEDDER_CPUS:
        need = light_total + MIN_EMBEDDER_CPUS * embedder_replicas
        raise ResourceFitError(
            f"the retrieval app needs at least {need:.2f} CPUs ({num_shards} shards x "
            f"{shard_replicas} replicas x {shard:g} + ingress {ingress:g} + Embedder "
            f"{embedder_replicas} x {MIN_EMBEDDER_CPUS:g}) but the Ray cluster has "
            f"{cluster_cpus:g} CPUs; use fewer shards or shard_replicas, lower shard_num_cpus / "
            "ingress_num_cpus, or add CPUs"
        )
    too_big = max(embedder, shard, ingress) > node_cpus + 1e-9
    if asked > cluster_cpus + 1e-9 or too_big:
        where = f"; its largest node has {node_cpus:g}" if too_big else ""
        raise ResourceFitError(
            f"the retrieval app asks for {asked:.2f} CPUs ({shape}) but the Ray cluster has "
            f"{cluster_cpus:g} CPUs{where}; lower embedder_num_cpus / shard_num_cpus / "
            "ingress_num_cpus (or leave them unset to size the app to the cluster), or use "
            "fewer shard_replicas / embedder_replicas"
        )
    return {"embedder": embedder, "shard": shard, "ingress": ingress}


def _check_gpus(asked: float, available: float, what: str) -> None:
    if asked > available + 1e-9:
        raise ResourceFitError(
            f"the retrieval app asks for {asked:g} GPUs ({what}) but the Ray cluster has "
            f"{available:g}; set num_gpus / shard_num_gpus lower (0 runs on CPUs)"
        )


# ---- embedder ----------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64)
class Embedder:
    """(H, W, 3) uint8 RGB image -> (D,) float32 L2-normalised embedding, batched across
    concurrent requests with `@serve.batch`. The model runs in a runtime of
    `reid_platform.retrieval.embedders` ("torch" or "onnx"), with `num_threads` compute threads
    (the replica's CPUs).

    `max_batch_size` and `batch_wait_timeout_s` come from `user_config`: a config deploy
    (`serve deploy`) that overrides only the Embedder's `user_config` reconfigures the running
    replicas without restarting them (see retrieval.yaml). `max_ongoing_requests` must be at
    least `max_batch_size` for full batches to form; `build_app` sets it.
    """

    def __init__(
        self, checkpoint: str, runtime: str = "torch", num_threads: int = 1, flip: bool = False
    ):
        keep_replica_grpc_on_loopback()
        # torch is imported here, not at module level: shard replicas import this module too.
        from reid_platform.retrieval.embedders import make_embedder

        self.model = make_embedder(runtime, checkpoint, "auto", num_threads)
        self.flip = flip
        self.batch_sizes: Counter[int] = Counter()
        self.max_batch_size, self.batch_wait_timeout_s = (
            DEFAULT_MAX_BATCH_SIZE,
            DEFAULT_BATCH_WAIT_S,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.max_batch_size = int(user_config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(
            user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)
        )
        self.embed_batch.set_max_batch_size(self.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def ready(self) -> bool:
        return True

    async def embed(self, image: np.ndarray) -> np.ndarray:
        return await self.embed_batch(image)

    async def embed_many(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, D) embeddings of B images sent in one call (a request's images or crops).

        They join `embed_batch` together, so they run as one batch (with whatever other
        requests are waiting), `max_batch_size` at a time.
        """
        vectors = await asyncio.gather(*[self.embed_batch(image) for image in images])
        return np.stack(vectors) if vectors else np.empty((0, 0), np.float32)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def embed_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(images)] += 1
        # In a thread, so requests keep joining the next batch while this one runs.
        vectors = await asyncio.to_thread(self.model.embed, images, self.flip)  # (B, D)
        return list(vectors)

    def info(self) -> dict[str, Any]:
        return {
            **self.model.info(),
            "tta": "flip" if self.flip else "none",
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "batch_sizes_seen": {str(size): n for size, n in sorted(self.batch_sizes.items())},
        }


# ---- one deployment per shard ------------------------------------------------------------


@serve.deployment(max_ongoing_requests=128, health_check_period_s=2.0)
class IndexShard:
    """One shard of the index (`open_shard`): search, add, remove, stats.

    Searches arriving together are coalesced (`@serve.batch`): one FAISS search per distinct
    filter per batch, each request then takes the first k of its rows. Writes are committed
    (fsynced) before they return; the index itself serialises writers across replicas and
    processes and catches up with their commits before every read.
    """

    def __init__(
        self,
        index_dir: str,
        shard_id: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        batching: dict[str, float] | None = None,
        write_timeout_s: float = WRITE_LOCK_TIMEOUT_S,
    ):
        keep_replica_grpc_on_loopback()
        self.shard = open_shard(index_dir, shard_id, lock_timeout_s=write_timeout_s)
        if nprobe is not None or ef_search is not None:
            self.shard.set_search_params(nprobe=nprobe, ef_search=ef_search)
        batching = batching or {}
        self.search_batch.set_max_batch_size(int(batching.get("max_batch_size", 64)))
        self.search_batch.set_batch_wait_timeout_s(float(batching.get("wait_s", 0.002)))
        self.batch_sizes: Counter[int] = Counter()  # queries per FAISS search call
        self._unsaved = 0

    def ready(self) -> bool:
        return True

    async def search(self, request: dict[str, Any]) -> dict[str, Any]:
        """Top-k of this shard for {"queries": (Q, D), "k", "where", "exclude"}: scores
        (Q, k'), ids and metadata per row."""
        return await self.search_batch(request)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=lambda rs: len(rs))
    async def search_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._search_many, requests)

    def _search_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[str, list[int]] = {}
        for n, r in enumerate(requests):
            key = json.dumps([r.get("where"), r.get("exclude")], sort_keys=True)
            groups.setdefault(key, []).append(n)
        out: list[dict[str, Any]] = [{} for _ in requests]
        for rows in groups.values():
            first = requests[rows[0]]
            queries = np.concatenate([requests[n]["queries"] for n in rows])  # (sum Q, D)
            k = max(int(requests[n]["k"]) for n in rows)
            self.batch_sizes[len(queries)] += 1
            try:
                scores, ids, meta = self.shard.search_with_metadata(
                    queries, k, first.get("where"), first.get("exclude")
                )
            except ValueError as err:  # a filter the index type cannot apply
                for n in rows:
                    out[n] = {"error": str(err)}
                continue
            start = 0
            for n in rows:
                q, k_n = len(requests[n]["queries"]), int(requests[n]["k"])
                row_ids = [row[:k_n] for row in ids[start : start + q]]
                out[n] = {
                    "scores": scores[start : start + q, :k_n],
                    "ids": row_ids,
                    "metadata": [row[:k_n] for row in meta[start : start + q]],
                }
                start += q
        return out

    def add(
        self,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[dict[str, Any]],
        views: dict[str, np.ndarray] | None = None,
    ) -> int:
        """Upsert items (with their extra views, an augmented index); returns once they are
        on disk."""
        self.shard.add(ids, vectors, metadata, views)
        self._maybe_snapshot(len(ids))
        return len(ids)

    def remove(self, ids: list[str]) -> dict[str, Any]:
        """Remove items; unknown ids remove nothing and are listed (the ingress answers 404)."""
        try:
            removed = self.shard.remove(ids)
        except UnknownIdError as err:
            return {"removed": 0, "unknown": err.ids}
        self._maybe_snapshot(removed)
        return {"removed": removed, "unknown": []}

    def stats(self) -> dict[str, Any]:
        return {
            **self.shard.stats(),
            "search_batch_sizes": {str(s): n for s, n in sorted(self.batch_sizes.items())},
        }

    def _maybe_snapshot(self, written: int) -> None:
        # Only speeds up the next open: items are durable in the db already.
        self._unsaved += written
        if self._unsaved >= SNAPSHOT_EVERY:
            self.shard.save()
            self._unsaved = 0


# ---- HTTP ingress ------------------------------------------------------------------------


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity, larger is closer")
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    """One image, no boxes, no label_key."""

    model_config = ConfigDict(extra="forbid")  # keeps the response union unambiguous

    results: list[SearchHit] = Field(description="best first")


class LabeledSearchResponse(SearchResponse):
    """One image, no boxes, with label_key."""

    label: Any = Field(description="the score-weighted vote of the hits' label_key values")
    label_score: float = Field(description="the voted label's share of the summed scores")


class QueryResults(BaseModel):
    index: int = Field(description="position of the image, or of the box, in the request")
    box: list[int] | None = Field(description="[x, y, w, h] cropped (null: the whole image)")
    results: list[SearchHit] = Field(description="best first")
    label: Any = Field(None, description="with label_key: the voted label (null: no vote)")
    label_score: float | None = Field(None, description="with label_key: the label's share")


class QueriesResponse(BaseModel):
    """Several images, or boxes: one entry per image or box, in request order."""

    model_config = ConfigDict(extra="forbid")

    queries: list[QueryResults]


class EmbedResponse(BaseModel):
    embedding: list[float] = Field(description="L2-normalised")
    dim: int


class GalleryAddResponse(BaseModel):
    added: list[str] = Field(description="ids now on disk (an existing id is replaced)")
    count: int


class DeleteResponse(BaseModel):
    deleted: str


class ErrorResponse(BaseModel):
    detail: str


class PartialWriteResponse(BaseModel):
    detail: str
    added: list[str] = Field(description="ids written (on disk) before the failure")
    not_added: list[str] = Field(description="ids not written")


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "not an image, truncated image, image too large, or malformed body"),
        (401, "missing or wrong bearer token"),
        (413, "body over the size limit"),
        (415, "unsupported content type"),
        (422, "a field is missing, malformed or out of range; the message names it"),
    ]
}
GALLERY_ERRORS = {
    **ERRORS,
    503: {"model": PartialWriteResponse, "description": "a shard failed; lists what was written"},
}


def _request_body(json_schema: dict[str, Any], form_schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody for a route that reads multipart or JSON by hand."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", **form_schema}},
                "application/json": {"schema": {"type": "object", **json_schema}},
            },
        }
    }


_FILE = {"type": "string", "format": "binary"}
_B64 = {"type": "string", "description": "base64 of the image file"}
_K = {"type": "integer", "default": DEFAULT_K, "minimum": 1}
_FILTER = {
    "type": "object",
    "additionalProperties": True,
    "description": 'metadata equality: {"camid": 3} or {"camid": [1, 2]} (any of)',
}
_FILTER_TEXT = {"type": "string", "description": "a JSON object, as in the JSON body"}
_BOXES = {
    "type": "array",
    "items": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
    "description": "[[x, y, w, h], ...] in pixels of the one image sent (e.g. a detector's "
    "boxes): each box is cropped and searched; a box past the right or bottom edge is clipped",
}
_LABEL_KEY = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_LABEL_KEY_LENGTH,
    "description": "a gallery metadata key (e.g. class): each query also gets label and "
    "label_score, the score-weighted vote of its hits",
}
SEARCH_BODY = _request_body(
    {
        "required": ["image_b64"],
        "properties": {
            "image_b64": {
                "oneOf": [_B64, {"type": "array", "items": _B64, "minItems": 1}],
                "description": "one image, or a list of images (one result list each)",
            },
            "k": _K,
            "where": _FILTER,
            "exclude": _FILTER,
            "boxes": _BOXES,
            "label_key": _LABEL_KEY,
        },
    },
    {
        "required": ["image"],
        "properties": {
            "image": {
                "type": "array",
                "items": _FILE,
                "minItems": 1,
                "description": "one or more image parts (one result list each)",
            },
            "k": _K,
            "where": _FILTER_TEXT,
            "exclude": _FILTER_TEXT,
            "boxes": {"type": "string", "description": "a JSON list of [x, y, w, h] boxes"},
            "label_key": _LABEL_KEY,
        },
    },
)
EMBED_BODY = _request_body(
    {"required": ["image_b64"], "properties": {"image_b64": _B64}},
    {"required": ["image"], "properties": {"image": _FILE}},
)
_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ID_LENGTH,
    "description": "no control characters, no '.' or '..' path segments",
}
GALLERY_BODY = _request_body(
    {
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["id", "image_b64"],
                    "properties": {"id": _ID, "image_b64": _B64, "metadata": {"type": "object"}},
                },
            }
        },
    },
    {
        "required": ["image", "id"],
        "properties": {
            "image": {"type": "array", "items": _FILE},
            "id": {"type": "array", "items": _ID, "description": "one per image"},
            "metadata": {
                "type": "array",
                "items": {"type": "string"},
                "description": "optional: one JSON object per image",
            },
        },
    },
)

DOCS_ASSETS = {
    name: Path(fastapi_offline.__file__).parent / "static" / name
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
}

api = FastAPI(
    title="reid-platform retrieval",
    version="1",
    description="Person re-identification search over a sharded FAISS gallery.",
    docs_url=None,  # served by the ingress, so that `docs_public` can protect them
    redoc_url=None,
    openapi_url=None,
)
bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV}, when set")


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a user value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def check_item_id(item_id: Any, field: str = "id") -> str:
    """A gallery id that can be stored, hashed to a shard and deleted by URL later.

    Raises:
        HTTPException: 422 naming the field and what is wrong.
    """
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_LENGTH:
        raise HTTPException(
            422,
            f"{field} must be a non-empty string of <= {MAX_ID_LENGTH} characters, "
            f"got {_shown(item_id)}",
        )
    bad = next((c for c in item_id if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        raise HTTPException(
            422,
            f"{field} {_shown(item_id)} contains the character U+{ord(bad):04X} (control "
            "characters, line separators and lone surrogates cannot be part of an id)",
        )
    if any(part in (".", "..") for part in item_id.split("/")):
        raise HTTPException(
            422, f"{field} {_shown(item_id)} has a '.' or '..' path segment (URLs drop them)"
        )
    return item_id


def _check_metadata(meta: Any, field: str) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise HTTPException(422, f"{field} must be a JSON object, got {_shown(meta)}")
    try:
        json.dumps(meta, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as err:  # NaN / Infinity
        raise HTTPException(422, f"{field}: {err} (NaN and Infinity are not JSON)") from None
    except UnicodeEncodeError:
        raise HTTPException(422, f"{field} holds a lone surrogate (not valid unicode)") from None
    except RecursionError:
        raise HTTPException(422, f"{field} is nested too deeply") from None
    return meta


def _parse_json(text: str | bytes, field: str, status: int) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise HTTPException(status, f"{field} is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, > 4300-digit integers
        raise HTTPException(status, f"{field} is not valid JSON: {_shown(str(err), 120)}") from None


def _root_cause(err: BaseException) -> str:
    """The user-facing reason of a failed shard call (Ray wraps the replica's exception)."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, ShardLockedError) or "ShardLockedError" in type(cause).__name__:
        return str(cause)
    return f"{type(cause).__name__}: {_shown(str(cause), 200)}"


class HopTimes:
    """Seconds spent in each step of a request, summed per step (one ingress replica)."""

    def __init__(self) -> None:
        self.total: defaultdict[str, float] = defaultdict(float)
        self.count: Counter[str] = Counter()

    def add(self, hop: str, seconds: float) -> None:
        self.total[hop] += seconds
        self.count[hop] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            hop: {"count": self.count[hop], "mean_ms": round(1e3 * t / self.count[hop], 3)}
            for hop, t in self.total.items()
        }


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class RetrievalIngress:
    """HTTP API: checks auth and limits, parses and decodes, embeds, fans out, merges."""

    def __init__(
        self, embedder: DeploymentHandle, shards: list[DeploymentHandle], settings: dict[str, Any]
    ):
        keep_replica_grpc_on_loopback()
        # The ingress decodes (so bad images fail here, with a 400); that module needs torch.
        from reid_platform.data.dataset import ImageDecodeError, crop_box, decode_image
        from reid_platform.retrieval.batch_search import label_vote

        self._decode_image, self._decode_error = decode_image, ImageDecodeError
        self._crop_box, self._label_vote = crop_box, label_vote
        self.embedder = embedder
        self.shards = shards
        self.index = settings["index"]
        self.max_k = int(settings["max_k"])
        self.max_images = int(settings.get("max_images", DEFAULT_MAX_IMAGES))
        self.max_boxes = int(settings.get("max_boxes", DEFAULT_MAX_BOXES))
        self.max_body_bytes = int(settings["max_body_bytes"])
        self.max_image_pixels = int(settings["max_image_pixels"])
        self.docs_public = bool(settings["docs_public"])
        self.metadata_path = str(settings["metadata_path"])
        root = settings.get("gallery_root")
        self._gallery_root = PurePosixPath(root) if root else None
        self.resources = settings.get("resources", {})
        self.model_uri = str(settings.get("model_uri", ""))  # the pinned registered version
        self._token = str(settings["auth_token"])
        self.hops = HopTimes()

    # -------------------------------------------------------------- routes
    @api.get("/healthz")
    async def healthz(self) -> Any:
        """200 {"status": "ok"} once every deployment answers; 503 naming those that do not."""
        names = ["Embedder"] + [f"shard_{i}" for i in range(len(self.shards))]
        handles = [self.embedder, *self.shards]
        answers = await asyncio.gather(
            *[asyncio.wait_for(h.ready.remote(), HEALTH_TIMEOUT_S) for h in handles],
            return_exceptions=True,
        )
        waiting = [n for n, a in zip(names, answers) if a is not True]
        if not waiting:
            return {"status": "ok"}
        return JSONResponse(
            {
                "status": "starting",
                "detail": f"not ready: {', '.join(waiting)} (no answer within "
                f"{HEALTH_TIMEOUT_S:g} s); `serve status` says why",
                "not_ready": waiting,
            },
            status_code=503,
        )

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> JSONResponse:
        if not self.docs_public:
            self._authorize(credentials)
        schema = dict(api.openapi())
        root = request.scope.get("root_path", "")
        if root:
            schema["servers"] = [{"url": root}]
        return JSONResponse(schema)

    @api.get("/docs", include_in_schema=False)
    async def docs(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> HTMLResponse:
        if not self.docs_public:
            self._authorize(credentials)
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=api.title,
            # the page's scripts come from this service, not a CDN: /docs works offline
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon.png",
        )

    @api.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> FileResponse:
        """Swagger UI's own files (public, like any CDN copy of them), from fastapi-offline."""
        path = DOCS_ASSETS.get(name)
        if path is None:
            raise HTTPException(404, f"no docs asset {_shown(name)}; known: {sorted(DOCS_ASSETS)}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    @api.post(
        "/v1/search",
        response_model=SearchResponse | LabeledSearchResponse | QueriesResponse,
        responses=ERRORS,
        openapi_extra=SEARCH_BODY,
    )
    async def search(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """Top-k gallery items for each image, or each box of one scene image.

        Multipart: `image` parts (one or more), `k`, and `where`, `exclude`, `boxes` as JSON
        strings, `label_key` as text. JSON: {"image_b64": one or a list, "k", "where",
        "exclude", "boxes", "label_key"}. One image without boxes answers {"results": [...]}
        (+ "label", "label_score" with label_key); several images or `boxes` answer
        {"queries": [{"index", "box", "results", "label", "label_score"}, ...]} in request
        order, the images or crops embedded as one batch.
        """
        self._authorize(credentials)
        start = time.perf_counter()
        images, fields, is_json = await self._read(request)
        k = self._k(fields.get("k", []))
        where = self._filter(fields, "where", is_json)
        exclude = self._filter(fields, "exclude", is_json)
        boxes = self._boxes(fields, is_json)
        label_key = self._label_key(fields)
        self._check_counts(images, boxes)
        self.hops.add("parse", time.perf_counter() - start)
        if boxes is None and len(images) == 1:
            image = await self._decode(images[0], "image")
            vector = await self._timed("embed", self.embedder.embed.remote(image))  # (D,)
            results = (await self._top_k(vector[None, :], k, where, exclude))[0]
            self.hops.add("total", time.perf_counter() - start)
            if label_key is None:
                return {"results": results}
            label, share = self._vote(results, label_key)
            return {"results": results, "label": label, "label_score": share}
        if boxes is None:
            names = [f"image {n}" for n in range(len(images))]
            crops = list(await asyncio.gather(*map(self._decode, images, names)))
        else:
            scene = await self._decode(images[0], "image")
            crops = [self._crop(scene, box, n) for n, box in enumerate(boxes)]
        queries = []
        if crops:
            vectors = await self._timed("embed", self.embedder.embed_many.remote(crops))  # (Q, D)
            for n, results in enumerate(await self._top_k(vectors, k, where, exclude)):
                label, share = self._vote(results, label_key) if label_key else (None, None)
                box = boxes[n] if boxes is not None else None
                queries.append(
                    dict(index=n, box=box, results=results, label=label, label_score=share)
                )
        self.hops.add("total", time.perf_counter() - start)
        return {"queries": queries}

    @api.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS, openapi_extra=EMBED_BODY)
    async def embed(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """The model's L2-normalised embedding of one image."""
        self._authorize(credentials)
        images, _, _ = await self._read(request)
        image = await self._decode(self._one(images), "image")
        vector = await self.embedder.embed.remote(image)
        return {"embedding": vector.tolist(), "dim": int(vector.shape[0])}

    @api.post(
        "/v1/gallery",
        response_model=GalleryAddResponse,
        responses=GALLERY_ERRORS,
        openapi_extra=GALLERY_BODY,
    )
    async def add_to_gallery(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Any:
        """Add (or replace) images with ids and metadata; answered once they are on disk.

        Every item is checked (id, metadata, image decoded and embedded) before anything is
        written. If a shard then fails, the 503 answer lists the ids written and not written.
        """
        self._authorize(credentials)
        images, fields, _ = await self._read(request)
        ids, metadata = self._gallery_fields(images, fields)
        arrays = await asyncio.gather(
            *[
                self._decode(data, f"image {n} (id {i!r})")
                for n, (data, i) in enumerate(zip(images, ids))
            ]
        )
        vectors = await asyncio.gather(*[self.embedder.embed.remote(a) for a in arrays])
        flipped = None
        if self.index.get("augment") == "flip":  # the index holds every item's mirror view too
            mirrors = [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
            flipped = await self.embedder.embed_many.remote(mirrors)  # (N, D)
        groups: dict[int, list[int]] = {}
        for row, item_id in enumerate(ids):
            groups.setdefault(shard_of(item_id, len(self.shards)), []).append(row)
        outcomes = await asyncio.gather(
            *[
                self.shards[s].add.remote(
                    [ids[r] for r in rows],
                    np.stack([vectors[r] for r in rows]),
                    [metadata[r] for r in rows],
                    None if flipped is None else {"flip": flipped[rows]},
                )
                for s, rows in groups.items()
            ],
            return_exceptions=True,
        )
        failed = {s: err for s, err in zip(groups, outcomes) if isinstance(err, BaseException)}
        if not failed:
            return {"added": ids, "count": len(ids)}
        written = [ids[r] for s, rows in groups.items() if s not in failed for r in rows]
        reasons = "; ".join(f"shard_{s}: {_root_cause(err)}" for s, err in failed.items())
        return JSONResponse(
            {
                "detail": f"{len(ids) - len(written)} of {len(ids)} items were not written "
                f"({reasons}); the others are on disk. Retry the ones not written.",
                "added": written,
                "not_added": [i for i in ids if i not in set(written)],
            },
            status_code=503,
        )

    @api.delete(
        "/v1/gallery/{item_id:path}",
        response_model=DeleteResponse,
        responses={
            404: {"model": ErrorResponse, "description": "unknown id"},
            401: ERRORS[401],
            422: ERRORS[422],
        },
    )
    async def delete_from_gallery(
        self, item_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, str]:
        """Remove one item by id (ids may contain '/'); answered once it is gone from disk."""
        self._authorize(credentials)
        check_item_id(item_id, "item_id")
        result = await self.shards[shard_of(item_id, len(self.shards))].remove.remote([item_id])
        if result["unknown"]:
            raise HTTPException(404, f"unknown gallery id {item_id!r}")
        return {"deleted": item_id}

    @api.get("/v1/stats", responses={401: ERRORS[401]})
    async def stats(
        self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """Items per shard, model, index type, the Embedder's and shards' batch sizes so far,
        and the mean time of each step of a search in this ingress replica."""
        self._authorize(credentials)
        shard_stats, info = await asyncio.gather(
            asyncio.gather(*[shard.stats.remote() for shard in self.shards]),
            self.embedder.info.remote(),
        )
        counts = [s["count"] for s in shard_stats]
        seen = info.pop("batch_sizes_seen")
        return {
            "model": {
                **{
                    k: info[k]
                    for k in (
                        "checkpoint",
                        "backbone",
                        "dim",
                        "device",
                        "input_size",
                        "runtime",
                        "tta",
                        "threads",
                        # the ONNX runtime's file and execution providers
                        "onnx",
                        "providers",
                    )
                    if k in info
                },
                "model_uri": self.model_uri,
            },
            "index": self.index,
            "items_per_shard": counts,
            "count": sum(counts),
            "batching": {
                "max_batch_size": info["max_batch_size"],
                "batch_wait_timeout_s": info["batch_wait_timeout_s"],
                "batch_sizes_seen": seen,
                "largest_batch_seen": max((int(size) for size in seen), default=0),
                "shard_search_batch_sizes": [s["search_batch_sizes"] for s in shard_stats],
            },
            "profile": self.hops.summary(),
            "resources": self.resources,
            "limits": {
                "max_k": self.max_k,
                "max_images": self.max_images,
                "max_boxes": self.max_boxes,
                "max_body_bytes": self.max_body_bytes,
                "max_image_pixels": self.max_image_pixels,
            },
        }

    # -------------------------------------------------------------- helpers
    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if not self._token:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), self._token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    async def _timed(self, hop: str, awaitable: Any) -> Any:
        start = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.hops.add(hop, time.perf_counter() - start)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if _K_TEXT.fullmatch(declared) and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large(len(body))
        return bytes(body)

    def _too_large(self, size: int) -> HTTPException:
        return HTTPException(
            413, f"request body of {size} bytes is over the limit of {self.max_body_bytes} bytes"
        )

    async def _read(self, request: Request) -> tuple[list[bytes], dict[str, list[Any]], bool]:
        """(image files in order, other fields, whether the body was JSON) from a multipart
        or JSON body. JSON: {"image_b64": ..., "k": ...} or {"items": [{"id", "image_b64",
        "metadata"}]}."""
        body = await self._body(request)
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            images, fields = await self._read_multipart(request, body)
            return images, fields, False
        if content_type.startswith("application/json"):
            images, fields = self._read_json(body)
            return images, fields, True
        raise HTTPException(
            415, f"content type {_shown(content_type or 'none')}: send multipart/form-data or JSON"
        )

    async def _read_multipart(
        self, request: Request, body: bytes
    ) -> tuple[list[bytes], dict[str, list[Any]]]:
        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream()).parse()
        except (MultiPartException, ValueError, KeyError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"malformed multipart body: {_shown(str(err), 120)}") from None
        images: list[bytes] = []
        fields: dict[str, list[Any]] = {}
        try:
            for name, value in form.multi_items():
                if name == "image":
                    if not isinstance(value, UploadFile):
                        raise HTTPException(422, "field 'image' must be a file part")
                    images.append(await value.read())
                elif isinstance(value, UploadFile):
                    raise HTTPException(422, f"field {_shown(name)} must be text, not a file")
                else:
                    fields.setdefault(name, []).append(value)
        finally:
            await form.close()
        return images, fields

    def _read_json(self, body: bytes) -> tuple[list[bytes], dict[str, list[Any]]]:
        data = _parse_json(body, "body", 400)
        if not isinstance(data, dict):
            raise HTTPException(422, "JSON body must be an object")
        items = data.get("items", [data])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise HTTPException(422, "'items' must be a list of objects")
        images: list[bytes] = []
        fields: dict[str, list[Any]] = {}
        for n, item in enumerate(items):
            if "image_b64" not in item:
                raise HTTPException(422, f"item {n}: field 'image_b64' is missing")
            value = item["image_b64"]
            # A search body may send a list of images; gallery items one image each.
            listed = isinstance(value, list) and "items" not in data
            if listed and not value:
                raise HTTPException(422, "'image_b64' is an empty list: send at least one image")
            for j, text in enumerate(value if listed else [value]):
                where = f"'image_b64'[{j}]" if listed else f"item {n}: 'image_b64'"
                if not isinstance(text, str):
                    plain = listed or "items" in data  # a single search image may be a list
                    what = "a base64 string" + ("" if plain else " or a list of them")
                    raise HTTPException(422, f"{where} must be {what}")
                try:
                    images.append(base64.b64decode(text, validate=True))
                except (binascii.Error, ValueError):
                    raise HTTPException(400, f"{where} is not valid base64") from None
            for name in ("id", "metadata"):
                if name in item:
                    fields.setdefault(name, []).append(item[name])
        for name in ("k", "where", "exclude", "boxes", "label_key"):
            if name in data:
                fields[name] = [data[name]]
        return images, fields

    @staticmethod
    def _one(images: list[bytes]) -> bytes:
        if len(images) != 1:
            raise HTTPException(422, f"send exactly one image (field 'image'), got {len(images)}")
        return images[0]

    def _k(self, values: list[Any]) -> int:
        if not values:
            return min(DEFAULT_K, self.max_k)
        raw = values[-1]
        if isinstance(raw, str) and _K_TEXT.fullmatch(raw.strip()):
            raw = int(raw.strip())
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise HTTPException(422, f"k must be an integer, got {_shown(raw)}")
        if not 1 <= raw <= self.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.max_k}, got {_shown(raw)}")
        return raw

    def _filter(self, fields: dict[str, list[Any]], name: str, is_json: bool) -> dict | None:
        values = fields.get(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise HTTPException(422, f"send field {name!r} once, got {len(values)}")
        spec = values[0] if is_json else _parse_json(values[0], f"field {name!r}", 422)
        if spec is None:
            return None
        try:
            return check_filter(spec, name) or None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    def _boxes(self, fields: dict[str, list[Any]], is_json: bool) -> list[list[int]] | None:
        """The `boxes` field as [x, y, w, h] integer pixels (numbers are rounded), or None."""
        values = fields.get("boxes", [])
        if not values:
            return None
        if len(values) > 1:
            raise HTTPException(422, f"send field 'boxes' once, got {len(values)}")
        spec = values[0] if is_json else _parse_json(values[0], "field 'boxes'", 422)
        if spec is None:
            return None
        if not isinstance(spec, list):
            raise HTTPException(
                422, f"boxes must be a JSON list of [x, y, w, h] boxes, got {_shown(spec)}"
            )
        if len(spec) > self.max_boxes:
            raise HTTPException(
                422,
                f"boxes: {len(spec)} boxes are more than the {self.max_boxes} a request may "
                "send (setting max_boxes); split the request",
            )
        boxes = []
        for n, box in enumerate(spec):
            if not (
                isinstance(box, list)
                and len(box) == 4
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
                and all(math.isfinite(v) for v in box)
            ):
                raise HTTPException(
                    422, f"boxes[{n}] must be [x, y, w, h] (4 finite numbers), got {_shown(box)}"
                )
            boxes.append([int(round(v)) for v in box])
        return boxes

    def _label_key(self, fields: dict[str, list[Any]]) -> str | None:
        values = fields.get("label_key", [])
        if not values or values[-1] is None:
            return None
        if len(values) > 1:
            raise HTTPException(422, f"send field 'label_key' once, got {len(values)}")
        key = values[0]
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_LABEL_KEY_LENGTH:
            raise HTTPException(
                422,
                f"label_key must be a metadata key: a string of 1 to {MAX_LABEL_KEY_LENGTH} "
                f"characters, got {_shown(key)}",
            )
        return key

    def _check_counts(self, images: list[bytes], boxes: list[list[int]] | None) -> None:
        if not images:
            raise HTTPException(422, "send at least one image (field 'image')")
        if len(images) > self.max_images:
            raise HTTPException(
                422,
                f"image: {len(images)} images are more than the {self.max_images} a request "
                "may send (setting max_images); split the request",
            )
        if boxes is not None and len(images) != 1:
            raise HTTPException(
                422, f"boxes belong to one scene image: send one image with them, not {len(images)}"
            )

    def _crop(self, scene: np.ndarray, box: list[int], n: int) -> np.ndarray:
        try:
            return self._crop_box(scene, box, f"boxes[{n}]")
        except self._decode_error as err:
            raise HTTPException(422, str(err)) from None

    def _vote(self, results: list[dict[str, Any]], label_key: str) -> tuple[Any, float]:
        """label_vote over the hits as answered (their public metadata)."""
        return self._label_vote(
            [h["score"] for h in results], [h["metadata"] for h in results], label_key
        )

    def _gallery_fields(
        self, images: list[bytes], fields: dict[str, list[Any]]
    ) -> tuple[list[str], list[dict[str, Any]]]:
        ids = fields.get("id", [])
        if not images:
            raise HTTPException(422, "send at least one image (field 'image')")
        if len(ids) != len(images):
            raise HTTPException(422, f"send one id per image: {len(images)} images, {len(ids)} ids")
        for n, item_id in enumerate(ids):
            check_item_id(item_id, f"id of item {n}")
        if len(set(ids)) != len(ids):
            raise HTTPException(422, "ids must be unique within one request")
        metadata = fields.get("metadata", [])
        if metadata and len(metadata) != len(images):
            raise HTTPException(
                422,
                f"send one metadata object per image or none: {len(images)} images, "
                f"{len(metadata)} metadata",
            )
        parsed = []
        for n, (item_id, meta) in enumerate(zip(ids, metadata or [{}] * len(ids))):
            field = f"metadata of item {n} (id {_shown(item_id)})"
            if isinstance(meta, str):
                meta = _parse_json(meta, field, 422)
            parsed.append(_check_metadata(meta, field))
        return ids, parsed

    async def _decode(self, data: bytes, source: str) -> np.ndarray:
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(self._decode_image, data, source, self.max_image_pixels)
        except self._decode_error as err:
            raise HTTPException(400, str(err)) from None
        finally:
            self.hops.add("decode", time.perf_counter() - start)

    async def _top_k(
        self, queries: np.ndarray, k: int, where: dict | None, exclude: dict | None
    ) -> list[list[dict[str, Any]]]:
        """Merged top-k of every shard for (Q, D) queries: Q lists of hits, best first."""
        request = {
            "queries": queries.astype(np.float32),
            "k": k,
            "where": where,
            "exclude": exclude,
        }
        parts = await self._timed(
            "search", asyncio.gather(*[shard.search.remote(request) for shard in self.shards])
        )
        start = time.perf_counter()
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise HTTPException(422, errors[0])
        scores, ids = merge_topk([(p["scores"], p["ids"]) for p in parts], k)
        out = []
        for q, (row_ids, row_scores) in enumerate(zip(ids, scores)):
            metadata = {i: m for p in parts for i, m in zip(p["ids"][q], p["metadata"][q])}
            out.append(
                [
                    {"id": i, "score": float(s), "metadata": self._public(metadata[i])}
                    for i, s in zip(row_ids, row_scores)
                ]
            )
        self.hops.add("merge", time.perf_counter() - start)
        return out

    def _public(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Metadata as answered: `path` per the `metadata_path` setting."""
        path = meta.get("path")
        if self.metadata_path == "absolute" or not isinstance(path, str):
            return meta
        meta = dict(meta)
        del meta["path"]
        if self.metadata_path == "relative":
            posix = PurePosixPath(path)
            if not posix.is_absolute():
                meta["path"] = path
            elif self._gallery_root is not None and posix.is_relative_to(self._gallery_root):
                meta["path"] = posix.relative_to(self._gallery_root).as_posix()
        return meta


# ---- app builder -------------------------------------------------------------------------


def _gallery_root(manifest: dict[str, Any]) -> str | None:
    """The directory item paths are relative to: the gallery root, or a manifest's folder."""
    gallery = manifest.get("extra", {}).get("gallery")
    if not gallery:
        return None
    path = Path(gallery)
    return str(path.parent if path.suffix.lower() == ".csv" or path.is_file() else path)


def _ensure_onnx_export(checkpoint: str, manifest: dict[str, Any]) -> str:
    """The ONNX export beside `checkpoint`, exported now (once, in the builder, not in every
    replica) when it is missing or stale. Its parity check runs on the checkpoint's query
    images, or on the index's gallery when the training data is gone.

    Raises:
        ValueError: the model cannot be exported, or its export disagrees with PyTorch.
    """
    from reid_platform.retrieval.export import ExportError, ensure_onnx

    try:
        gallery = manifest.get("extra", {}).get("gallery") or None
        return str(ensure_onnx(checkpoint, fallback_parity_data=gallery))
    except ExportError as err:
        raise ValueError(f"runtime=onnx: {err}") from None


def start_http(host: str, port: int) -> None:
    """Start Serve with its HTTP proxy on host:port, before `serve run` would start it on
    127.0.0.1:8000 (the import-path form has no option for it).

    Raises:
        ValueError: Serve already runs on this cluster on another host or port (its proxy
            cannot move while it runs).
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        running = client.http_config
        if (running.host, running.port) != (host, port):
            raise ValueError(
                f"http_host={host} http_port={port}: Serve already runs on this Ray cluster "
                f"with its proxy on {running.host}:{running.port}; use that port, or stop "
                "Serve first (`serve shutdown`, or the `serve run` that started it)"
            )
        return
    serve.start(http_options={"host": host, "port": port})


def serving_checkpoint(args: RetrievalArgs, manifest: dict[str, Any], index_dir: Path) -> str:
    """What the Embedder loads: `model_uri` pinned to its version (`models:/demo@production`
    -> `models:/demo/7`, so every replica, and a replica restarted after the alias moved, runs
    the same model; downloaded into the model cache now), else the `checkpoint` path or URI,
    else the index manifest's. The model must embed in the index's dimension and, when the
    manifest records the training run of the model it was built by, be that model.

    Raises:
        ValueError: both or neither given, a dimension that differs from the index's, or a
            model of another training run than the index's.
        reid_platform.checkpoint.CheckpointError: a path or URI that does not resolve.
    """
    import torch  # here, not at module level: shard replicas import this module too

    from reid_platform.checkpoint import checkpoint_file, read_checkpoint, resolve_checkpoint_ref
    from reid_platform.config import Config
    from reid_platform.models import build_model
    from reid_platform.tracking import is_model_uri

    if args.model_uri and args.checkpoint:
        raise ValueError("give checkpoint or model_uri, not both")
    key = "model_uri" if args.model_uri else "checkpoint"
    value = args.model_uri or args.checkpoint or manifest.get("extra", {}).get("checkpoint", "")
    if not value:
        raise ValueError(f"{index_dir}: its manifest names no checkpoint; pass checkpoint=...")
    if args.model_uri and not is_model_uri(args.model_uri):
        raise ValueError(f"model_uri={args.model_uri!r}: expected models:/NAME@ALIAS, "
                         "models:/NAME/VERSION or runs:/RUN_ID/PATH (a path goes in checkpoint)")
    if is_model_uri(value):
        checkpoint = resolve_checkpoint_ref(value, key)
    else:
        checkpoint = str(checkpoint_file(Path(value).expanduser().resolve()))
    payload = read_checkpoint(checkpoint)
    config = Config.from_saved(payload["config"])
    with torch.device("meta"):  # the architecture only: its embedding size, no weights
        model = build_model(config.replace(**{"model.pretrained": ""}).model,
                            payload["num_classes"], (config.data.height, config.data.width))
    if int(model.embedding_dim) != int(manifest["dim"]):
        raise ValueError(
            f"{key}={value}: the model embeds in {model.embedding_dim} dimensions but the index "
            f"{index_dir} holds {manifest['dim']}-dimensional vectors; serve it with an index "
            "built by that model (jobs/build_index.py --checkpoint ...)"
        )
    # Another model of the same size embeds into another space: its searches over this index
    # would be meaningless. The manifest records the training run of the model it was built by.
    built_by = manifest.get("extra", {}).get("run_id", "")
    serving = (payload.get("mlflow_run") or {}).get("run_id", "")
    if built_by and serving and built_by != serving:
        built = manifest["extra"].get("model_uri") or f"run {built_by}"
        raise ValueError(
            f"{key}={value}: the index {index_dir} was built by another model ({built}; this "
            f"one is from run {serving}): build an index with it first (jobs/build_index.py "
            f"--checkpoint {value})"
        )
    return checkpoint


def build_app(args: RetrievalArgs) -> Application:
    """The retrieval application for an index directory (a typed Serve app builder).

    One `IndexShard` deployment per shard (`shard_0`, ...), each with `shard_replicas`
    replicas; one `Embedder` (a GPU each when the cluster has GPUs, unless `num_gpus` says);
    the FastAPI `RetrievalIngress` in front. CPU requests are sized to the cluster
    (`plan_cpus`). With `runtime: onnx` the Embedder runs the checkpoint's ONNX export under
    ONNX Runtime with the replica's CPUs as threads; a checkpoint without a current export is
    exported here first (`_ensure_onnx_export`).

    Raises:
        ResourceFitError: the cluster cannot hold the app (names asked and available).
        FileNotFoundError, ValueError: no index or checkpoint at the paths given.
    """
    if isinstance(args, dict):  # called directly rather than by `serve run`
        args = RetrievalArgs.model_validate(args)
    index_dir = Path(args.index_dir).expanduser().resolve()
    manifest = read_manifest(index_dir)
    checkpoint = serving_checkpoint(args, manifest, index_dir)
    if not ray.is_initialized():
        # `serve run module:build_app` calls the builder before ray.init: start the same
        # loopback-only local Ray as the jobs (or join $RAY_ADDRESS).
        init_ray()
    if {"http_host", "http_port"} & args.model_fields_set:
        start_http(args.http_host, args.http_port)
    if args.runtime == "onnx":
        _ensure_onnx_export(checkpoint, manifest)
    num_shards = int(manifest["num_shards"])
    # Queries must be embedded as the gallery was (jobs/build_index.py --tta).
    tta = manifest.get("extra", {}).get("tta", "none") if args.tta == "auto" else args.tta
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = plan_cpus(
        num_shards,
        args.shard_replicas,
        args.embedder_replicas,
        cluster_cpus=float(ray.cluster_resources().get("CPU", 0.0)),
        node_cpus=max((float(r.get("CPU", 0.0)) for r in nodes), default=None),
        embedder=args.embedder_num_cpus,
        shard=args.shard_num_cpus,
        ingress=args.ingress_num_cpus,
    )
    num_gpus = gpus_per_actor(args.num_gpus)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    _check_gpus(
        num_gpus * args.embedder_replicas + args.shard_num_gpus * num_shards * args.shard_replicas,
        cluster_gpus,
        f"Embedder {args.embedder_replicas} x {num_gpus:g}, {num_shards} shards x "
        f"{args.shard_replicas} replicas x {args.shard_num_gpus:g}",
    )
    embedder = Embedder.options(
        num_replicas=args.embedder_replicas,
        max_ongoing_requests=max(64, 2 * args.max_batch_size),
        ray_actor_options={"num_cpus": cpus["embedder"], "num_gpus": num_gpus},
        user_config={
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        },
    ).bind(checkpoint, args.runtime, max(1, round(cpus["embedder"])), tta == "flip")
    batching = {
        "max_batch_size": args.shard_max_batch_size,
        "wait_s": args.shard_batch_wait_timeout_s,
    }
    shards = [
        IndexShard.options(
            name=f"shard_{i}",
            num_replicas=args.shard_replicas,
            max_ongoing_requests=max(128, 2 * args.shard_max_batch_size),
            ray_actor_options={"num_cpus": cpus["shard"], "num_gpus": args.shard_num_gpus},
        ).bind(str(index_dir), i, args.nprobe, args.ef_search, batching, args.write_timeout_s)
        for i in range(num_shards)
    ]
    settings = {
        "index": {
            "index_dir": str(index_dir),
            "index_type": manifest["index_type"],
            "metric": manifest["metric"],
            "dim": manifest["dim"],
            "num_shards": num_shards,
            "augment": manifest.get("extra", {}).get("augment", "none"),
        },
        "max_k": args.max_k,
        "max_images": args.max_images,
        "max_boxes": args.max_boxes,
        "max_body_bytes": args.max_body_bytes,
        "max_image_pixels": args.max_image_pixels,
        "docs_public": args.docs_public,
        "metadata_path": args.metadata_path,
        "gallery_root": _gallery_root(manifest),
        "auth_token": args.auth_token,
        "model_uri": checkpoint if checkpoint.startswith(("models:/", "runs:/")) else "",
        "resources": {
            "cpus_per_replica": cpus,
            "embedder_gpus": num_gpus,
            "cluster_cpus": float(ray.cluster_resources().get("CPU", 0.0)),
        },
    }
    return RetrievalIngress.options(ray_actor_options={"num_cpus": cpus["ingress"]}).bind(
        embedder, shards, settings
    )
