"""Retrieval service on Ray Serve: batched embedding, one deployment per index shard, merged top-k.

    HTTP --> RetrievalIngress (FastAPI: auth, body limit, decode, fan-out)
               |--> Embedder (@serve.batch, GPU when present): image -> (D,) unit vector
               |--> shard_0 .. shard_{n-1} (IndexShard, each opens only its own shard,
               |        each may have replicas), queried in parallel
               '--> merge_topk --> {"results": [{"id", "score", "metadata"}, ...]}

    serve run serve_apps.retrieval:build_app index_dir=~/reid-platform/index
    serve run serve_apps/retrieval.yaml

Writes (POST /v1/gallery, DELETE /v1/gallery/{id}) go to the shard that owns the id (the
index's `shard_of` hash) and are answered only after that shard's SQLite commit is fsynced,
so a restarted application or a replaced replica serves the same gallery. Replicas of one
shard share its files: a file lock serialises their writes, and before every read a replica
catches up with commits made by the others (SQLite `PRAGMA data_version` tells it cheaply).
"""

import asyncio
import base64
import binascii
import fcntl
import json
import os
import secrets
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from reid_platform.retrieval.index import (
    DB_NAME,
    UnknownIdError,
    merge_topk,
    open_shard,
    read_manifest,
    shard_of,
)
from reid_platform.runtime import gpus_per_actor, init_ray, resolve_device

TOKEN_ENV = "REID_SERVE_TOKEN"
DEFAULT_K = 10
WRITE_LOCK_NAME = "writer.lock"
SNAPSHOT_EVERY = 1000  # items written between FAISS snapshots of a shard (the db is the truth)
MAX_ID_LENGTH = 1024


class RetrievalArgs(BaseModel):
    """Arguments of `build_app`: `serve run ... key=value` or the `args:` of the YAML."""

    model_config = ConfigDict(extra="forbid")

    index_dir: str = Field(description="index directory written by jobs/build_index.py")
    checkpoint: str = Field("", description="model checkpoint; empty: the index manifest's")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Embedder batch (user_config)")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, le=10.0, description="Embedder batch wait (user_config)"
    )
    max_body_bytes: int = Field(10 * 2**20, ge=1024, description="larger bodies get 413")
    max_k: int = Field(100, ge=1, description="largest k a search may ask for")
    auth_token: str = Field(
        default_factory=lambda: os.environ.get(TOKEN_ENV, ""),
        repr=False,
        description=f"bearer token; default: ${TOKEN_ENV}; empty: no auth",
    )
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard deployment")
    embedder_replicas: int = Field(1, ge=1)
    num_gpus: float | None = Field(
        None, ge=0.0, description="GPUs per Embedder; None: 1 if the cluster has"
    )
    shard_num_gpus: float = Field(0.0, ge=0.0, description="GPUs per shard replica (faiss-gpu)")
    embedder_num_cpus: float = Field(1.0, ge=0.0)
    shard_num_cpus: float = Field(0.25, ge=0.0)
    ingress_num_cpus: float = Field(0.5, ge=0.0)
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched per query")
    ef_search: int | None = Field(None, ge=1, description="HNSW efSearch")


# ---- embedder ----------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=64)
class Embedder:
    """(H, W, 3) uint8 RGB image -> (D,) float32 L2-normalised embedding, batched across
    concurrent requests with `@serve.batch`.

    `max_batch_size` and `batch_wait_timeout_s` come from `user_config`: a config deploy
    (`serve deploy`) that overrides only the Embedder's `user_config` reconfigures the running
    replicas without restarting them (see retrieval.yaml). `max_ongoing_requests` must be at
    least `max_batch_size` for full batches to form; `build_app` sets it.
    """

    def __init__(self, checkpoint: str):
        # torch is imported here, not at module level: shard replicas import this module too.
        import torch

        from reid_platform.checkpoint import load_model
        from reid_platform.data.transforms import build_eval_transform

        self._torch = torch
        self.device = resolve_device("auto")
        self.model, config = load_model(checkpoint, self.device)
        self.transform = build_eval_transform(config.data.height, config.data.width)
        self.checkpoint = checkpoint
        self.backbone = config.model.backbone
        self.input_size = (config.data.height, config.data.width)
        self.batch_sizes: Counter[int] = Counter()
        self.max_batch_size, self.batch_wait_timeout_s = 16, 0.005

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.max_batch_size = int(user_config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(
            user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)
        )
        self.embed_batch.set_max_batch_size(self.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def embed(self, image: np.ndarray) -> np.ndarray:
        return await self.embed_batch(image)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes[len(images)] += 1
        # In a thread, so requests keep joining the next batch while this one runs.
        vectors = await asyncio.to_thread(self._forward, images)  # (B, D)
        return list(vectors)

    def _forward(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        batch = torch.stack([self.transform(image=image)["image"] for image in images])
        with torch.inference_mode():
            return self.model.embed(batch.to(self.device)).float().cpu().numpy()

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "backbone": self.backbone,
            "dim": int(self.model.embedding_dim),
            "device": str(self.device),
            "input_size": list(self.input_size),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "batch_sizes_seen": {str(size): n for size, n in sorted(self.batch_sizes.items())},
        }


# ---- one deployment per shard ------------------------------------------------------------


@serve.deployment(max_ongoing_requests=32, health_check_period_s=2.0)
class IndexShard:
    """One shard of the index (`open_shard`): search, add, remove, stats.

    Writes are committed (fsynced) before they return. Replicas of the same shard take a file
    lock to write and re-read the shard when another replica has committed.
    """

    def __init__(
        self, index_dir: str, shard_id: int, nprobe: int | None = None, ef_search: int | None = None
    ):
        shard_dir = Path(index_dir) / f"shard_{shard_id}"
        # Read the db version before opening: a commit in between then shows as a change.
        self._watch = sqlite3.connect(shard_dir / DB_NAME, check_same_thread=False)
        self._version = self._data_version()
        self.shard = open_shard(index_dir, shard_id)
        if nprobe is not None or ef_search is not None:
            self.shard.set_search_params(nprobe=nprobe, ef_search=ef_search)
        self._lock = threading.RLock()  # Serve runs sync methods in a thread pool
        self._lock_file = open(shard_dir / WRITE_LOCK_NAME, "a+")
        self._unsaved = 0

    def _data_version(self) -> int:
        # Changes whenever another connection (another replica, or our Shard) commits.
        return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    def _catch_up(self) -> None:
        version = self._data_version()
        if version != self._version:
            self.shard.refresh()
            self._version = version

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                self._catch_up()
                yield
                self._version = self._data_version()  # our own commit: nothing to re-read
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def search(self, queries: np.ndarray, k: int) -> dict[str, Any]:
        """Top-k of this shard for (Q, D) queries: scores (Q, k'), ids and metadata per row."""
        with self._lock:
            for attempt in range(3):
                self._catch_up()
                scores, ids = self.shard.search(queries, k)
                try:
                    flat = self.shard.get_metadata([i for row in ids for i in row])
                    break
                except UnknownIdError:  # removed by another replica between the two reads
                    if attempt == 2:
                        raise
        rows, start = [], 0
        for row in ids:
            rows.append(flat[start : start + len(row)])
            start += len(row)
        return {"scores": scores, "ids": ids, "metadata": rows}

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any]]) -> int:
        """Upsert items; returns once they are on disk."""
        with self._writing():
            self.shard.add(ids, vectors, metadata)
            self._maybe_snapshot(len(ids))
        return len(ids)

    def remove(self, ids: list[str]) -> dict[str, Any]:
        """Remove items; unknown ids remove nothing and are listed (the ingress answers 404)."""
        with self._writing():
            try:
                removed = self.shard.remove(ids)
            except UnknownIdError as err:
                return {"removed": 0, "unknown": err.ids}
            self._maybe_snapshot(removed)
        return {"removed": removed, "unknown": []}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            return self.shard.stats()

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
    results: list[SearchHit] = Field(description="best first")


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


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "not an image, truncated image or malformed body"),
        (401, "missing or wrong bearer token"),
        (413, "body over the size limit"),
        (415, "unsupported content type"),
        (422, "a field is missing or out of range (k)"),
    ]
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
SEARCH_BODY = _request_body(
    {"required": ["image_b64"], "properties": {"image_b64": _B64, "k": _K}},
    {"required": ["image"], "properties": {"image": _FILE, "k": _K}},
)
EMBED_BODY = _request_body(
    {"required": ["image_b64"], "properties": {"image_b64": _B64}},
    {"required": ["image"], "properties": {"image": _FILE}},
)
GALLERY_BODY = _request_body(
    {
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "image_b64"],
                    "properties": {
                        "id": {"type": "string"},
                        "image_b64": _B64,
                        "metadata": {"type": "object"},
                    },
                },
            }
        },
    },
    {
        "required": ["image", "id"],
        "properties": {
            "image": {"type": "array", "items": _FILE},
            "id": {"type": "array", "items": {"type": "string"}, "description": "one per image"},
            "metadata": {
                "type": "array",
                "items": {"type": "string"},
                "description": "optional: one JSON object per image",
            },
        },
    },
)

api = FastAPI(
    title="reid-platform retrieval",
    version="1",
    description="Person re-identification search over a sharded FAISS gallery.",
)
bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV}, when set")


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class RetrievalIngress:
    """HTTP API: checks auth and limits, decodes images, embeds, fans out, merges."""

    def __init__(
        self, embedder: DeploymentHandle, shards: list[DeploymentHandle], settings: dict[str, Any]
    ):
        # The ingress decodes (so bad images fail here, with a 400); that module needs torch.
        from reid_platform.data.dataset import ImageDecodeError, decode_image

        self._decode_image, self._decode_error = decode_image, ImageDecodeError
        self.embedder = embedder
        self.shards = shards
        self.index = settings["index"]
        self.max_k = int(settings["max_k"])
        self.max_body_bytes = int(settings["max_body_bytes"])
        self._token = str(settings["auth_token"])

    # -------------------------------------------------------------- routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post(
        "/v1/search", response_model=SearchResponse, responses=ERRORS, openapi_extra=SEARCH_BODY
    )
    async def search(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """Top-k gallery items for one image: multipart `image` + `k`, or JSON."""
        self._authorize(credentials)
        images, fields = await self._read(request)
        k = self._k(fields.get("k", []))
        image = await self._decode(self._one(images), "image")
        vector = await self.embedder.embed.remote(image)  # (D,)
        return {"results": await self._top_k(vector, k)}

    @api.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS, openapi_extra=EMBED_BODY)
    async def embed(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """The model's L2-normalised embedding of one image."""
        self._authorize(credentials)
        images, _ = await self._read(request)
        image = await self._decode(self._one(images), "image")
        vector = await self.embedder.embed.remote(image)
        return {"embedding": vector.tolist(), "dim": int(vector.shape[0])}

    @api.post(
        "/v1/gallery",
        response_model=GalleryAddResponse,
        responses=ERRORS,
        openapi_extra=GALLERY_BODY,
    )
    async def add_to_gallery(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """Add (or replace) images with ids and metadata; answered once they are on disk."""
        self._authorize(credentials)
        images, fields = await self._read(request)
        ids, metadata = self._gallery_fields(images, fields)
        arrays = await asyncio.gather(
            *[
                self._decode(data, f"image {n} (id {i!r})")
                for n, (data, i) in enumerate(zip(images, ids))
            ]
        )
        vectors = await asyncio.gather(*[self.embedder.embed.remote(a) for a in arrays])
        groups: dict[int, list[int]] = {}
        for row, item_id in enumerate(ids):
            groups.setdefault(shard_of(item_id, len(self.shards)), []).append(row)
        await asyncio.gather(
            *[
                self.shards[s].add.remote(
                    [ids[r] for r in rows],
                    np.stack([vectors[r] for r in rows]),
                    [metadata[r] for r in rows],
                )
                for s, rows in groups.items()
            ]
        )
        return {"added": ids, "count": len(ids)}

    @api.delete(
        "/v1/gallery/{item_id:path}",
        response_model=DeleteResponse,
        responses={404: {"model": ErrorResponse, "description": "unknown id"}, 401: ERRORS[401]},
    )
    async def delete_from_gallery(
        self, item_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, str]:
        """Remove one item by id (ids may contain '/'); answered once it is gone from disk."""
        self._authorize(credentials)
        result = await self.shards[shard_of(item_id, len(self.shards))].remove.remote([item_id])
        if result["unknown"]:
            raise HTTPException(404, f"unknown gallery id {item_id!r}")
        return {"deleted": item_id}

    @api.get("/v1/stats", responses={401: ERRORS[401]})
    async def stats(
        self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict[str, Any]:
        """Items per shard, model, index type and the Embedder's batch sizes so far."""
        self._authorize(credentials)
        shard_stats, info = await asyncio.gather(
            asyncio.gather(*[shard.stats.remote() for shard in self.shards]),
            self.embedder.info.remote(),
        )
        counts = [s["count"] for s in shard_stats]
        seen = info.pop("batch_sizes_seen")
        return {
            "model": {
                k: info[k] for k in ("checkpoint", "backbone", "dim", "device", "input_size")
            },
            "index": self.index,
            "items_per_shard": counts,
            "count": sum(counts),
            "batching": {
                "max_batch_size": info["max_batch_size"],
                "batch_wait_timeout_s": info["batch_wait_timeout_s"],
                "batch_sizes_seen": seen,
                "largest_batch_seen": max((int(size) for size in seen), default=0),
            },
            "limits": {"max_k": self.max_k, "max_body_bytes": self.max_body_bytes},
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

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
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

    async def _read(self, request: Request) -> tuple[list[bytes], dict[str, list[Any]]]:
        """(image files in order, other fields) from a multipart or JSON body.

        JSON: {"image_b64": ..., "k": ...} or {"items": [{"id", "image_b64", "metadata"}]}.
        """
        body = await self._body(request)
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            return await self._read_multipart(request, body)
        if content_type.startswith("application/json"):
            return self._read_json(body)
        raise HTTPException(
            415, f"content type {content_type or 'none'!r}: send multipart/form-data or JSON"
        )

    async def _read_multipart(
        self, request: Request, body: bytes
    ) -> tuple[list[bytes], dict[str, list[Any]]]:
        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream()).parse()
        except MultiPartException as err:
            raise HTTPException(400, f"malformed multipart body: {err}") from None
        images: list[bytes] = []
        fields: dict[str, list[Any]] = {}
        try:
            for name, value in form.multi_items():
                if name == "image":
                    if not isinstance(value, UploadFile):
                        raise HTTPException(422, "field 'image' must be a file part")
                    images.append(await value.read())
                else:
                    fields.setdefault(name, []).append(value)
        finally:
            await form.close()
        return images, fields

    def _read_json(self, body: bytes) -> tuple[list[bytes], dict[str, list[Any]]]:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"body is not valid JSON: {err}") from None
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
            if not isinstance(item["image_b64"], str):
                raise HTTPException(422, f"item {n}: 'image_b64' must be a base64 string")
            try:
                images.append(base64.b64decode(item["image_b64"], validate=True))
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"item {n}: 'image_b64' is not valid base64") from None
            for name in ("id", "metadata"):
                if name in item:
                    fields.setdefault(name, []).append(item[name])
        if "k" in data:
            fields["k"] = [data["k"]]
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
        if isinstance(raw, str) and raw.strip().lstrip("+-").isdigit():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise HTTPException(422, f"k must be an integer, got {raw!r}")
        if not 1 <= raw <= self.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.max_k}, got {raw}")
        return raw

    def _gallery_fields(
        self, images: list[bytes], fields: dict[str, list[Any]]
    ) -> tuple[list[str], list[dict[str, Any]]]:
        ids = fields.get("id", [])
        if not images:
            raise HTTPException(422, "send at least one image (field 'image')")
        if len(ids) != len(images):
            raise HTTPException(422, f"send one id per image: {len(images)} images, {len(ids)} ids")
        for item_id in ids:
            if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_LENGTH:
                raise HTTPException(
                    422,
                    f"ids must be non-empty strings of <= {MAX_ID_LENGTH} characters, "
                    f"got {item_id!r}",
                )
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
        for item_id, meta in zip(ids, metadata or [{}] * len(ids)):
            if isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except json.JSONDecodeError:
                    meta = None
            if not isinstance(meta, dict):
                raise HTTPException(422, f"metadata of id {item_id!r} must be a JSON object")
            parsed.append(meta)
        return ids, parsed

    async def _decode(self, data: bytes, source: str) -> np.ndarray:
        try:
            return await asyncio.to_thread(self._decode_image, data, source)
        except self._decode_error as err:
            raise HTTPException(400, str(err)) from None

    async def _top_k(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        queries = vector[None, :].astype(np.float32)  # (1, D)
        parts = await asyncio.gather(*[shard.search.remote(queries, k) for shard in self.shards])
        scores, ids = merge_topk([(p["scores"], p["ids"]) for p in parts], k)
        metadata = {i: m for p in parts for i, m in zip(p["ids"][0], p["metadata"][0])}
        return [
            {"id": item_id, "score": float(score), "metadata": metadata[item_id]}
            for item_id, score in zip(ids[0], scores[0])
        ]


# ---- app builder -------------------------------------------------------------------------


def build_app(args: RetrievalArgs) -> Application:
    """The retrieval application for an index directory (a typed Serve app builder).

    One `IndexShard` deployment per shard (`shard_0`, ...), each with `shard_replicas`
    replicas; one `Embedder` (a GPU each when the cluster has GPUs, unless `num_gpus` says);
    the FastAPI `RetrievalIngress` in front.
    """
    if isinstance(args, dict):  # called directly rather than by `serve run`
        args = RetrievalArgs.model_validate(args)
    index_dir = Path(args.index_dir).expanduser().resolve()
    manifest = read_manifest(index_dir)
    checkpoint = args.checkpoint or manifest.get("extra", {}).get("checkpoint", "")
    if not checkpoint:
        raise ValueError(f"{index_dir}: its manifest names no checkpoint; pass checkpoint=...")
    checkpoint = str(Path(checkpoint).expanduser().resolve())
    if not ray.is_initialized():
        # `serve run module:build_app` calls the builder before ray.init: start the same
        # loopback-only local Ray as the jobs (or join $RAY_ADDRESS).
        init_ray()
    num_gpus = gpus_per_actor(args.num_gpus)
    model_file = Path(checkpoint) / "model.pt" if Path(checkpoint).is_dir() else Path(checkpoint)
    if not model_file.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no model file at {model_file}")
    embedder = Embedder.options(
        num_replicas=args.embedder_replicas,
        max_ongoing_requests=max(64, 2 * args.max_batch_size),
        ray_actor_options={"num_cpus": args.embedder_num_cpus, "num_gpus": num_gpus},
        user_config={
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        },
    ).bind(checkpoint)
    shards = [
        IndexShard.options(
            name=f"shard_{i}",
            num_replicas=args.shard_replicas,
            ray_actor_options={"num_cpus": args.shard_num_cpus, "num_gpus": args.shard_num_gpus},
        ).bind(str(index_dir), i, args.nprobe, args.ef_search)
        for i in range(int(manifest["num_shards"]))
    ]
    settings = {
        "index": {
            "index_dir": str(index_dir),
            "index_type": manifest["index_type"],
            "metric": manifest["metric"],
            "dim": manifest["dim"],
            "num_shards": manifest["num_shards"],
        },
        "max_k": args.max_k,
        "max_body_bytes": args.max_body_bytes,
        "auth_token": args.auth_token,
    }
    return RetrievalIngress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus}).bind(
        embedder, shards, settings
    )
