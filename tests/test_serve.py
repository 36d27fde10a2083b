"""The retrieval service through HTTP on 127.0.0.1: exact top-k against brute force over
/v1/embed vectors (1 and 3 shards), real batching, live reconfiguration, every bad-input case,
auth, durability across an application restart and the loss of a shard replica.

Two applications share one Serve instance on the session's Ray: "s3" (3 shards, no auth) and
"s1" (1 shard with 2 replicas, bearer token). Both are deleted at the end of the module.
"""

import base64
import io
import json
import os
import re
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import httpx
import hypothesis
import hypothesis.errors
import numpy as np
import pytest
import schemathesis
import yaml
from PIL import Image
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow

TOKEN = "test-token-123"
MAX_K = 100
BODY_LIMIT = 64 * 1024
APPS = {"s3": 3, "s1": 1}  # app name -> shards
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(index_dir: Path, name: str, **overrides) -> dict:
    """Small CPU reservations: the session's Ray has 4 CPUs and other tests share it."""
    args = {
        "index_dir": str(index_dir),
        "max_k": MAX_K,
        "max_body_bytes": BODY_LIMIT,
        "batch_wait_timeout_s": 0.05,
        "embedder_num_cpus": 0.5,
        "ingress_num_cpus": 0.2,
        "shard_num_cpus": 0.1,
        "auth_token": TOKEN if name == "s1" else "",
        "shard_replicas": 2 if name == "s1" else 1,
        # s1: docs behind the token, no paths in results; s3: public docs, relative paths, and
        # a short write lock wait so that a held lock fails a write quickly.
        "docs_public": name != "s1",
        "metadata_path": "omit" if name == "s1" else "relative",
        "write_timeout_s": 2.0,
    }
    args.update(overrides)
    return args


def all_args(index_dirs: dict[str, Path]) -> dict[str, dict]:
    return {name: app_args(index_dirs[name], name) for name in APPS}


def deploy(apps: dict[str, dict], embedder_config: dict | None = None) -> None:
    """Deploy the test apps as `serve deploy` does: a config with import path and args (the
    declarative API, where a change of `user_config` alone reconfigures running replicas)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": []}
    for name, args in apps.items():
        app = {
            "name": f"reid-test-{name}",
            "route_prefix": f"/reid-test-{name}",
            "import_path": "serve_apps.retrieval:build_app",
            "args": args,
        }
        if embedder_config and name in embedder_config:
            app["deployments"] = [{"name": "Embedder", "user_config": embedder_config[name]}]
        config["applications"].append(app)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 240
    while True:
        statuses = {n: serve.status().applications.get(f"reid-test-{n}") for n in apps}
        if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
            return
        failed = [s.message for s in statuses.values() if s is not None and "FAIL" in s.status]
        assert not failed and time.monotonic() < deadline, failed or statuses
        time.sleep(0.5)


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    directory = tmp_path_factory.mktemp("serve") / "checkpoint"
    return save_checkpoint(directory, build_model(config.model, num_classes=12), config, 0)


@pytest.fixture(scope="module")
def gallery(tiny_market, checkpoint) -> SimpleNamespace:
    """The tiny Market gallery embedded in-process (test_build_index covers Ray Data)."""
    from reid_platform.checkpoint import load_model
    from reid_platform.evaluation.embed import extract_features
    from reid_platform.retrieval.gallery import gallery_samples, sample_metadata

    samples, _ = gallery_samples(tiny_market)
    model, config = load_model(checkpoint)
    features = extract_features(model, samples, config.data.height, config.data.width)
    assert len(features.indices) == len(samples)
    return SimpleNamespace(
        ids=[s.item_id for s in samples],
        vectors=features.feats,
        metadata=[sample_metadata(s) for s in samples],
    )


@pytest.fixture(scope="module")
def index_dirs(tmp_path_factory, gallery, checkpoint, tiny_market) -> dict[str, Path]:
    from reid_platform.retrieval import ShardedIndex

    out = {}
    extra = {"checkpoint": str(checkpoint), "gallery": str(tiny_market)}  # as build_index
    for name, shards in APPS.items():
        path = tmp_path_factory.mktemp("serve") / f"index-{name}"
        with ShardedIndex.create(path, gallery.vectors.shape[1], shards, extra=extra) as index:
            index.add(gallery.ids, gallery.vectors, gallery.metadata)
            index.save()
        out[name] = path
    return out


@pytest.fixture(scope="module")
def serve_port(ray_session) -> int:
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    # Serve may already run for another module: ask it which port it listens on.
    http = ray_session.get(_get_global_client()._controller.get_http_config.remote())
    assert http.host == "127.0.0.1"
    return http.port


@pytest.fixture(scope="module")
def apps(ray_session, serve_port, index_dirs):
    from ray import serve

    deploy(all_args(index_dirs))
    yield
    for name in APPS:
        serve.delete(f"reid-test-{name}")


@pytest.fixture(scope="module")
def clients(apps, serve_port):
    made = {}
    for name in APPS:
        headers = {"Authorization": f"Bearer {TOKEN}"} if name == "s1" else {}
        made[name] = httpx.Client(
            base_url=f"http://127.0.0.1:{serve_port}/reid-test-{name}",
            headers=headers,
            timeout=60.0,
        )
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def query_images(tiny_market) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tiny_market / "query").iterdir())[:5]]


# ---- helpers -----------------------------------------------------------------------------


def embed(client: httpx.Client, image: bytes) -> np.ndarray:
    response = client.post("/v1/embed", files={"image": image})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == len(body["embedding"])
    return np.asarray(body["embedding"], dtype=np.float32)


def search(client: httpx.Client, image: bytes, k: int) -> list[dict]:
    response = client.post("/v1/search", files={"image": image}, data={"k": str(k)})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def assert_same_ranking(results: list[dict], ids: list[str], scores: np.ndarray) -> None:
    """Same ids rank by rank, scores within 1e-5; neighbours closer than that may swap."""
    assert len(results) == len(ids)
    got = np.array([r["score"] for r in results])
    np.testing.assert_allclose(got, scores, atol=1e-5)
    assert np.all(np.diff(got) <= 1e-7), "results must be best first"
    for rank, (hit, expected) in enumerate(zip(results, ids)):
        if hit["id"] != expected:  # only a near-tie may reorder
            tied = np.abs(scores - scores[rank]) <= 1e-5
            assert hit["id"] in {ids[j] for j in np.flatnonzero(tied)}, (rank, hit, expected)


def wait_until(check, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def kill_one_replica(ray_session, app: str, deployment: str) -> None:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(
        a["name"]
        for a in ray_session.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )
    assert names, f"no replica of {app}/{deployment}"
    ray_session.kill(ray_session.get_actor(names[0], namespace="serve"), no_restart=True)


# ---- arguments and config (no Ray) -------------------------------------------------------


def test_args_are_typed_and_token_defaults_to_env(monkeypatch):
    from pydantic import ValidationError

    from serve_apps.retrieval import RetrievalArgs

    monkeypatch.setenv("REID_SERVE_TOKEN", "from-env")
    args = RetrievalArgs.model_validate({"index_dir": "/x", "max_k": "7"})
    assert args.max_k == 7 and args.auth_token == "from-env" and args.checkpoint == ""
    assert "from-env" not in repr(args)
    for bad in (
        {"index_dir": "/x", "max_k": 0},
        {"index_dir": "/x", "max_batch_size": 0},
        {"index_dir": "/x", "no_such_arg": 1},
        {},
    ):
        with pytest.raises(ValidationError):
            RetrievalArgs.model_validate(bad)


def test_serve_config_file_listens_on_loopback_8000():
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.retrieval import RetrievalArgs

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "serve_apps" / "retrieval.yaml").read_text())
    )
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    (app,) = config.applications
    assert app.import_path == "serve_apps.retrieval:build_app"
    RetrievalArgs.model_validate(app.args)


# ---- through HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(APPS))
def test_search_equals_brute_force_over_embed(clients, gallery, query_images, name):
    client = clients[name]
    paths = [m["path"] for m in gallery.metadata]
    vectors = np.stack([embed(client, Path(p).read_bytes()) for p in paths])  # (N, D)
    np.testing.assert_allclose(vectors, gallery.vectors, atol=1e-5)  # served == Ray Data
    for n, image in enumerate(query_images):
        query = embed(client, image)
        scores = vectors @ query  # (N,) cosine: both sides are unit vectors
        order = np.argsort(-scores, kind="stable")
        for k in (1, 5, MAX_K):  # MAX_K > N: every item comes back
            results = search(client, image, k)
            top = order[:k]
            assert_same_ranking(results, [gallery.ids[j] for j in top], scores[top])
        if n == 0:
            hit = results[0]
            stored = dict(gallery.metadata[gallery.ids.index(hit["id"])])
            if name == "s1":  # metadata_path "omit"
                del stored["path"]
            else:  # "relative": to the gallery root, never the server's absolute path
                stored["path"] = hit["id"]  # ids are paths relative to the root here
            assert hit["metadata"] == stored
            as_json = client.post(
                "/v1/search", json={"image_b64": base64.b64encode(image).decode(), "k": 3}
            )
            assert as_json.status_code == 200
            assert [r["id"] for r in as_json.json()["results"]] == [r["id"] for r in results[:3]]


def test_stats_and_docs(clients, gallery):
    for name, shards in APPS.items():
        stats = clients[name].get("/v1/stats").json()
        assert len(stats["items_per_shard"]) == shards
        assert stats["count"] == sum(stats["items_per_shard"]) == len(gallery.ids)
        assert stats["index"]["index_type"] == "Flat"
        assert stats["model"]["backbone"] == "test_resnet"
    docs = clients["s3"].get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # offline: every script and style sheet of the page comes from the service itself
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and not [a for a in assets if "://" in a], assets
    for asset in assets:
        response = clients["s3"].get(asset.removeprefix(str(clients["s3"].base_url.path)))
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert clients["s3"].get("/docs/assets/swagger-ui-bundle.js").text.startswith("/*")
    missing = clients["s3"].get("/docs/assets/consts.py")  # a file of the package, not listed
    assert missing.status_code == 404 and "no docs asset" in missing.text
    paths = clients["s3"].get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/embed", "/v1/gallery", "/v1/stats", "/healthz"} <= set(paths)


def test_embedder_batches_concurrent_requests(clients, query_images):
    client = clients["s3"]
    images = query_images * 5
    singles = [embed(client, image) for image in query_images]
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        batched = list(pool.map(lambda image: embed(client, image), images))
    for n, vector in enumerate(batched):  # batching must not change a result
        np.testing.assert_allclose(vector, singles[n % len(query_images)], atol=1e-5)
    batching = client.get("/v1/stats").json()["batching"]
    assert batching["largest_batch_seen"] > 1, batching


def test_batch_settings_change_live(clients, index_dirs):
    client = clients["s3"]
    before = client.get("/v1/stats").json()["batching"]
    deploy(all_args(index_dirs), {"s3": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}})
    after = wait_until(
        lambda: (b := client.get("/v1/stats").json()["batching"])["max_batch_size"] == 4 and b,
        60,
        "the new batch size",
    )
    assert after["batch_wait_timeout_s"] == 0.02
    # The same replica was reconfigured, not replaced: it remembers its batches.
    assert after["batch_sizes_seen"] == before["batch_sizes_seen"]


def test_bad_input_gets_json_errors_and_service_keeps_serving(clients, query_images):
    client = clients["s3"]
    image = query_images[0]

    def check(response, status: int) -> None:
        assert response.status_code == status, response.text
        assert isinstance(response.json()["detail"], str | list)

    check(client.post("/v1/search", files={"image": b"not an image at all"}), 400)
    check(client.post("/v1/search", files={"image": image[: len(image) // 2]}), 400)
    check(client.post("/v1/embed", files={"image": image[:100]}), 400)
    check(client.post("/v1/search", json={"image_b64": "!!not base64!!"}), 400)
    check(
        client.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"}),
        400,
    )
    check(client.post("/v1/search", files={"image": image + b"\0" * BODY_LIMIT}), 413)
    check(client.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}), 415)
    for k in ("0", str(MAX_K + 1), "-1", "abc"):
        check(client.post("/v1/search", files={"image": image}, data={"k": k}), 422)
    check(
        client.post("/v1/search", json={"image_b64": base64.b64encode(image).decode(), "k": 2.5}),
        422,
    )
    check(client.post("/v1/search", data={"k": "3"}, files={"other": image}), 422)
    check(client.post("/v1/gallery", files={"image": image}), 422)  # no id
    check(client.post("/v1/gallery", files={"image": b"junk"}, data={"id": "x"}), 400)
    check(client.delete("/v1/gallery/no/such/id.jpg"), 404)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert len(search(client, image, 3)) == 3


def test_bearer_token_is_required_when_set(clients, serve_port, query_images):
    open_client = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/reid-test-s1")
    with open_client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for response in (
                open_client.post("/v1/search", files={"image": query_images[0]}, headers=headers),
                open_client.post("/v1/embed", files={"image": query_images[0]}, headers=headers),
                open_client.get("/v1/stats", headers=headers),
                open_client.delete("/v1/gallery/x", headers=headers),
            ):
                assert response.status_code == 401, response.text
                assert "detail" in response.json()
        assert open_client.get("/healthz").status_code == 200
    assert len(search(clients["s1"], query_images[0], 2)) == 2


def test_shard_replicas_agree_and_losing_one_keeps_the_gallery(
    ray_session, clients, gallery, query_images
):
    """s1 has one shard with two replicas: a write through either is seen by both, and after
    one replica is lost the same gallery (with the API's writes) is served."""
    client = clients["s1"]
    image = query_images[1]
    added = client.post(
        "/v1/gallery",
        files={"image": image},
        data={"id": "replica/new.jpg", "metadata": '{"source": "api"}'},
    )
    assert added.status_code == 200, added.text
    for _ in range(6):  # requests spread over both replicas
        assert search(client, image, 1)[0]["id"] == "replica/new.jpg"
    removed = gallery.ids[0]
    assert client.delete(f"/v1/gallery/{removed}").status_code == 200
    for _ in range(6):
        found = {r["id"] for r in search(client, image, MAX_K)}
        assert "replica/new.jpg" in found and removed not in found
    before = search(client, image, MAX_K)
    kill_one_replica(ray_session, "reid-test-s1", "shard_0")
    for _ in range(6):  # the survivor serves; a request caught by the dead one is retried
        assert wait_until(lambda: search(client, image, MAX_K), 60, "a search") == before


def shard_ids(num_shards: int, count: int, prefix: str) -> list[str]:
    """`count` new ids on distinct shards (count <= num_shards)."""
    from reid_platform.retrieval import shard_of

    out: dict[int, str] = {}
    n = 0
    while len(out) < count:
        out.setdefault(shard_of(f"{prefix}-{n}", num_shards), f"{prefix}-{n}")
        n += 1
    return list(out.values())


def check_json_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail


def test_no_500s_each_reported_case_is_a_json_4xx(clients, query_images):
    """Every input that returned a plain-text 500 before: a JSON 4xx naming the field."""
    from hardening import png_bomb

    client = clients["s3"]
    image = query_images[0]
    for k in ("+-5", "\u00b2", "9" * 5000, "1e3", " "):
        check_json_error(client.post("/v1/search", files={"image": image}, data={"k": k}), 422, "k")
    # 30,000 levels (the test app's body limit is 64 KB; Python's parser gives up near 1,000)
    nested = b'{"image_b64": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    response = client.post(
        "/v1/search", content=nested, headers={"content-type": "application/json"}
    )
    check_json_error(response, 400, "body", "nested too deeply")
    huge = b'{"k": ' + b"9" * 5000 + b"}"
    check_json_error(
        client.post("/v1/search", content=huge, headers={"content-type": "application/json"}),
        400,
        "body is not valid JSON",
    )
    b64 = base64.b64encode(image).decode()
    # Raw JSON texts: NaN and lone surrogates cannot be written by json.dumps.
    nan = '{"items": [{"id": "x", "image_b64": "B64", "metadata": {"a": NaN}}]}'.replace("B64", b64)
    check_json_error(
        client.post("/v1/gallery", content=nan, headers={"content-type": "application/json"}),
        422,
        "metadata of item 0",
        "NaN",
    )
    surrogate = '{"items": [{"id": "a\\ud800b", "image_b64": "B64"}]}'.replace("B64", b64)
    check_json_error(
        client.post("/v1/gallery", content=surrogate, headers={"content-type": "application/json"}),
        422,
        "id of item 0",
        "U+D800",
    )
    meta_surrogate = '{"items": [{"id": "ok", "image_b64": "B64", "metadata": {"a": "\\udc00"}}]}'
    check_json_error(
        client.post(
            "/v1/gallery",
            content=meta_surrogate.replace("B64", b64),
            headers={"content-type": "application/json"},
        ),
        422,
        "metadata of item 0",
        "surrogate",
    )
    check_json_error(client.delete("/v1/gallery/"), 422, "item_id")
    for bad_id in ("line\nbreak", "tab\there", "nul\x00", "a/../b", "."):  # never deletable
        response = client.post("/v1/gallery", files={"image": image}, data={"id": bad_id})
        check_json_error(response, 422, "id of item 0")
    for field, value, words in [
        ("where", "{", ("field 'where'", "not valid JSON")),
        ("where", '{"camid": {"gt": 1}}', ("where.camid",)),
        ("exclude", "[1]", ("exclude must be an object",)),
        ("where", '{"camid": NaN}', ("where.camid", "finite")),
    ]:
        response = client.post("/v1/search", files={"image": image}, data={"k": "3", field: value})
        check_json_error(response, 422, *words)
    response = client.post("/v1/search", files={"image": png_bomb()})
    check_json_error(response, 400, "11000x11000 = 121000000 pixels", f"limit of {4096 * 4096}")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert len(search(client, image, 3)) == 3


def test_gallery_post_is_validated_whole_before_any_write(clients, query_images):
    """Two items on different shards, the second bad: nothing is written (before: a 500 and
    the first item committed)."""
    from hardening import png_bomb

    client = clients["s3"]
    first, second = shard_ids(3, 2, "atomic")
    before = client.get("/v1/stats").json()["items_per_shard"]
    image = query_images[0]
    cases = [
        ({"image": [image, image]}, ['{"ok": 1}', '{"a": NaN}'], 422, "metadata of item 1"),
        ({"image": [image, b"junk"]}, ["{}", "{}"], 400, "image 1"),
        ({"image": [image, png_bomb()]}, ["{}", "{}"], 400, "over the limit"),
        ({"image": [image, image]}, ["{}", "[1, 2]"], 422, "metadata of item 1"),
    ]
    for files, metadata, status, words in cases:
        response = client.post(
            "/v1/gallery",
            files=[("image", data) for data in files["image"]],
            data={"id": [first, second], "metadata": metadata},
        )
        check_json_error(response, status, words)
    assert client.get("/v1/stats").json()["items_per_shard"] == before
    assert client.delete(f"/v1/gallery/{first}").status_code == 404


def test_a_shard_failing_mid_write_is_answered_with_what_was_written(
    clients, index_dirs, query_images
):
    """A shard whose write lock another writer holds (s3 waits 2 s): 503 listing exactly the
    ids written and not written; the written one is searchable, the other absent."""
    from reid_platform.retrieval import shard_of

    client = clients["s3"]
    written, blocked = shard_ids(3, 2, "partial")
    db_path = index_dirs["s3"] / f"shard_{shard_of(blocked, 3)}" / "shard.sqlite"
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a build_index re-run holding the lock
    try:
        response = client.post(
            "/v1/gallery",
            files=[("image", query_images[1]), ("image", query_images[2])],
            data={"id": [written, blocked]},
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert response.status_code == 503, response.text
    body = response.json()
    assert (body["added"], body["not_added"]) == ([written], [blocked])
    assert f"shard_{shard_of(blocked, 3)}" in body["detail"] and "write lock" in body["detail"]
    assert search(client, query_images[1], 1)[0]["id"] == written
    assert client.delete(f"/v1/gallery/{blocked}").status_code == 404
    assert client.delete(f"/v1/gallery/{written}").status_code == 200


def filtered_reference(gallery, query: np.ndarray, k: int, where=None, exclude=None):
    def match(meta, spec):
        return all(
            meta.get(key) in (value if isinstance(value, list) else [value])
            for key, value in spec.items()
        )

    keep = [
        j
        for j, m in enumerate(gallery.metadata)
        if (not where or match(m, where)) and not (exclude and match(m, exclude))
    ]
    scores = gallery.vectors[keep] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [gallery.ids[keep[j]] for j in order], scores[order]


@pytest.mark.parametrize(
    ("where", "exclude"),
    [({"camid": 1}, None), (None, {"camid": 1}), ({"pid": [1, 2, 3]}, {"camid": 0})],
)
def test_filters_over_http_equal_brute_force(clients, gallery, query_images, where, exclude):
    client = clients["s3"]
    for image in query_images[:2]:
        query = embed(client, image)
        for k in (3, MAX_K):  # MAX_K > matching items: every match, and nothing else
            ids, scores = filtered_reference(gallery, query, k, where, exclude)
            data = {"k": str(k)}
            data.update(
                {n: json.dumps(v) for n, v in (("where", where), ("exclude", exclude)) if v}
            )
            response = client.post("/v1/search", files={"image": image}, data=data)
            assert response.status_code == 200, response.text
            assert_same_ranking(response.json()["results"], ids, scores)
        body = {"image_b64": base64.b64encode(image).decode(), "k": 3}
        body.update({n: v for n, v in (("where", where), ("exclude", exclude)) if v})
        as_json = client.post("/v1/search", json=body).json()["results"]
        assert [r["id"] for r in as_json] == filtered_reference(gallery, query, 3, where, exclude)[
            0
        ]


def test_concurrent_searches_are_coalesced_and_equal_one_by_one(clients, query_images):
    client = clients["s3"]
    requests = [
        (image, k, where) for image in query_images for k, where in ((2, None), (7, '{"camid": 2}'))
    ]

    def run(request):
        image, k, where = request
        data = {"k": str(k), **({"where": where} if where else {})}
        response = client.post("/v1/search", files={"image": image}, data=data)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    one_by_one = [run(r) for r in requests]
    before = client.get("/v1/stats").json()["batching"]["shard_search_batch_sizes"]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(run, requests * 2))
    for got, alone in zip(together, one_by_one * 2):  # batched embeddings differ by ~1e-7
        assert_same_ranking(got, [h["id"] for h in alone], np.array([h["score"] for h in alone]))
        assert all(h["metadata"]["path"] == h["id"] for h in got)  # no metadata mixed up
    after = client.get("/v1/stats").json()["batching"]["shard_search_batch_sizes"]
    coalesced = [
        int(size)
        for shard in after
        for size in shard
        if int(size) > 1 and shard[size] > before[after.index(shard)].get(size, 0)
    ]
    assert coalesced, after  # some FAISS calls searched several requests' queries at once
    profile = client.get("/v1/stats").json()["profile"]
    assert {"parse", "decode", "embed", "search", "merge", "total"} <= set(profile)


def test_docs_need_the_token_when_not_public(clients, serve_port):
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/reid-test-s1") as anonymous:
        for path in ("/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 401
    assert "swagger" in clients["s1"].get("/docs").text.lower()
    assert "/v1/search" in clients["s1"].get("/openapi.json").json()["paths"]


def test_http_port_cannot_move_a_running_serve(clients, serve_port):
    from serve_apps.retrieval import start_http

    start_http("127.0.0.1", serve_port)  # the port it runs on: nothing to do
    with pytest.raises(ValueError, match=rf"http_port={serve_port + 1}: .*127.0.0.1:{serve_port}"):
        start_http("127.0.0.1", serve_port + 1)


def test_every_listening_socket_is_loopback(clients):
    """The session's Ray (started by init_ray like every job) with two apps up: GCS, raylet,
    dashboard and agents, the Serve proxy and every replica listen on loopback only."""
    from hardening import is_loopback, listening_sockets, process_tree

    sockets = listening_sockets(process_tree(os.getpid()))
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("ProxyActor" in n for n in names), sockets
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, exposed
    print(f"{len(sockets)} listening sockets, all loopback: {sockets}")


def test_healthz_names_what_is_not_ready_and_refusal_names_resources(
    ray_session, clients, index_dirs
):
    from ray import serve

    from serve_apps.retrieval import ResourceFitError, build_app

    # Asks for more CPUs than the cluster has: refused before anything is deployed.
    with pytest.raises(ResourceFitError, match=r"asks for 50\.\d+ CPUs .* has 4 CPUs"):
        build_app(app_args(index_dirs["s3"], "s3", embedder_num_cpus=49.5))
    # Fits the cluster, not what the two test apps leave free: shard_0 never starts.
    pending = app_args(index_dirs["s1"], "pending", shard_num_cpus=3.0, shard_replicas=1)
    apps = {**all_args(index_dirs), "pending": pending}
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {
        "applications": [
            {
                "name": f"reid-test-{n}",
                "route_prefix": f"/reid-test-{n}",
                "import_path": "serve_apps.retrieval:build_app",
                "args": a,
            }
            for n, a in apps.items()
        ]
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    client = httpx.Client(
        base_url=clients["s3"].base_url.copy_with(path="/reid-test-pending"), timeout=30
    )
    try:
        # 503 while anything starts; once the Embedder and ingress are up, only shard_0 is named.
        answer = wait_until(
            lambda: (
                (r := client.get("/healthz")).status_code == 503
                and r.json()["not_ready"] == ["shard_0"]
                and r
            ),
            180,
            "a 503 naming shard_0 alone",
        )
        assert "not ready: shard_0" in answer.json()["detail"]
    finally:
        client.close()
        deploy(all_args(index_dirs))  # the pending app goes, the others stay as they are
    wait_until(lambda: "reid-test-pending" not in serve.status().applications, 60, "removal")


def test_writes_survive_restart(clients, index_dirs, gallery, query_images):
    from ray import serve

    client = clients["s3"]
    new = {"api/new-1.jpg": query_images[2], "api/new-2.jpg": query_images[3]}
    response = client.post(
        "/v1/gallery",
        files=[("image", data) for data in new.values()],
        data={"id": list(new), "metadata": [json.dumps({"n": n}) for n in range(len(new))]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"added": list(new), "count": 2}
    top = search(client, new["api/new-1.jpg"], 1)[0]
    assert (top["id"], top["metadata"]) == ("api/new-1.jpg", {"n": 0})
    assert abs(top["score"] - 1.0) < 1e-5
    assert client.delete("/v1/gallery/api/new-2.jpg").json() == {"deleted": "api/new-2.jpg"}
    assert client.delete("/v1/gallery/api/new-2.jpg").status_code == 404
    expected = search(client, query_images[3], MAX_K)
    assert len(expected) == len(gallery.ids) + 1
    counts = client.get("/v1/stats").json()["items_per_shard"]

    serve.delete("reid-test-s3")
    deploy(all_args(index_dirs))
    assert search(client, query_images[3], MAX_K) == expected  # new-1 present, new-2 absent
    assert client.get("/v1/stats").json()["items_per_shard"] == counts
    assert client.delete("/v1/gallery/api/new-2.jpg").status_code == 404


# ---- fuzzing (last: it writes to the s3 gallery, and removes what it added) -------------

FUZZ_BUDGET_S = 60.0  # both fuzz tests together stop generating after this
FUZZ = {"requests": 0, "start": 0.0, "added": set()}


def gallery_count(client: httpx.Client) -> int:
    return client.get("/v1/stats").json()["count"]


def check_invariant(client: httpx.Client, method: str, path: str, response, before: int) -> None:
    """A 2xx or a JSON 4xx naming what is wrong; the service alive; the gallery changed only
    by a 2xx write, and by at most what it says it wrote."""
    FUZZ["requests"] += 1
    status = response.status_code
    assert status < 500, f"{method} {path}: {status} {response.text[:300]}"
    if status >= 400:
        content_type = response.headers.get("content-type", "")
        if isinstance(content_type, list):  # schemathesis' Response: one list per header
            content_type = content_type[0] if content_type else ""
        assert content_type.startswith("application/json"), response.text
        assert response.json()["detail"], response.text
    assert client.get("/healthz").status_code == 200  # alive
    after = gallery_count(client)
    if status < 300 and method == "POST" and path.endswith("/v1/gallery"):
        added = response.json()["added"]
        FUZZ["added"].update(added)
        assert before <= after <= before + len(added)
    elif status < 300 and method == "DELETE":
        assert after == before - 1
    else:
        assert after == before, f"{method} {path} answered {status} but changed the gallery"


def test_fuzz_every_route_from_the_openapi_schema(clients, serve_port):
    """Schemathesis: requests generated from the service's own schema, for every route and
    field (random bytes for images, random JSON shapes and unicode, numbers at the edges),
    positive (schema-valid) and negative (schema-violating) cases."""
    from hypothesis import given

    FUZZ["start"] = time.monotonic()
    base = f"http://127.0.0.1:{serve_port}/reid-test-s3"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/search", "/v1/gallery", "/v1/stats"}
    client = clients["s3"]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=8,
                deadline=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                if time.monotonic() - FUZZ["start"] > FUZZ_BUDGET_S / 2:
                    return
                before = gallery_count(client)
                response = case.call(base_url=base, timeout=60)
                check_invariant(client, case.method.upper(), case.formatted_path, response, before)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                # e.g. no schema-violating request exists for GET /healthz (no parameters)
                assert mode == GenerationMode.NEGATIVE, operation.label


def encoded_image(width: int, height: int, seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("P" if fmt == "GIF" else "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def fuzz_strategies():
    from hypothesis import strategies as st

    valid = st.builds(
        encoded_image,
        st.integers(1, 80),
        st.integers(1, 80),
        st.integers(0, 2**16),
        st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]),
    )
    images = st.one_of(
        valid,
        valid.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
        st.binary(max_size=300),
    )
    ids = st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: f"fz/{t}"),
        st.sampled_from(["", ".", "..", "a/../b", "x\n", "/lead", "trail/", "sp ace", "%2F"]),
    )
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
    )
    json_values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    )
    ks = st.one_of(st.integers(-3, 2**63), st.text(max_size=8), st.floats(), json_values)
    return images, ids, json_values, ks


def test_fuzz_multipart_images_ids_and_fields(clients):
    """Hypothesis where the schema cannot say enough: real and broken images of every format,
    unicode ids, random metadata, k and filters, as multipart and as JSON."""
    from hypothesis import given
    from hypothesis import strategies as st

    images, ids, json_values, ks = fuzz_strategies()
    client = clients["s3"]

    @hypothesis.settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        database=None,
    )
    @given(
        st.lists(st.tuples(images, ids, json_values), min_size=1, max_size=3),
        ks,
        json_values,
        st.sampled_from(["search", "gallery", "delete"]),
        st.booleans(),
    )
    def run(items, k, where, route, as_json):
        if time.monotonic() - FUZZ["start"] > FUZZ_BUDGET_S:
            return
        before = gallery_count(client)
        if route == "delete":
            path = f"/v1/gallery/{quote(items[0][1], safe='/')}"
            response = client.delete(path)
            check_invariant(client, "DELETE", path, response, before)
            return
        path = "/v1/search" if route == "search" else "/v1/gallery"
        if as_json:
            entries = [
                {"id": i, "image_b64": base64.b64encode(b).decode(), "metadata": m}
                for b, i, m in items
            ]
            body = {"items": entries} if route == "gallery" else {**entries[0], "k": k}
            body["where"] = where
            # Encoded here: NaN and Infinity go out as the literals some clients send
            # (httpx's own encoder refuses them).
            response = client.post(
                path, content=json.dumps(body), headers={"content-type": "application/json"}
            )
        else:
            data = {"k": str(k), "where": json.dumps(where)}
            if route == "gallery":
                data = {
                    "id": [i for _, i, _ in items],
                    "metadata": [json.dumps(m) for *_, m in items],
                }
            response = client.post(path, files=[("image", b) for b, _, _ in items], data=data)
        check_invariant(client, "POST", path, response, before)

    run()


def test_fuzz_left_the_service_whole(clients, gallery):
    client = clients["s3"]
    for item_id in sorted(FUZZ["added"]):
        assert client.delete(f"/v1/gallery/{item_id}").status_code in (200, 404)
    print(f"fuzz: {FUZZ['requests']} requests, {len(FUZZ['added'])} ids added and removed")
    assert FUZZ["requests"] >= 50
    assert client.get("/healthz").json() == {"status": "ok"}
