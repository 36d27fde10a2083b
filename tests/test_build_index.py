"""jobs/build_index.py: Ray Data embedding into a sharded index (ids, metadata, manifest),
exactness against in-process embeddings, safe re-runs, CSV manifests with ids, extra columns
and a corrupt image, and which images each gallery format yields."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from reid_platform.data.formats import DatasetError

pytestmark = pytest.mark.slow  # Ray Data actor pools


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    directory = tmp_path_factory.mktemp("build-index") / "checkpoint"
    return save_checkpoint(directory, build_model(config.model, num_classes=12), config, 0)


def run_job(*args: str) -> dict:
    import build_index

    return build_index.main([*args, "--workers", "1", "--batch-size", "16", "--no-progress"])


def reference_features(checkpoint: Path, samples) -> np.ndarray:
    from reid_platform.checkpoint import load_model
    from reid_platform.evaluation.embed import extract_features

    model, config = load_model(checkpoint)
    return extract_features(model, samples, config.data.height, config.data.width).feats


def test_market_gallery_index_is_exact_and_rerun_is_safe(
    ray_session, tiny_market, checkpoint, tmp_path, capsys
):
    from reid_platform.data.formats import load_market1501
    from reid_platform.retrieval import ShardedIndex, read_manifest, shard_of

    out = tmp_path / "index"
    args = [
        "--checkpoint",
        str(checkpoint),
        "--gallery",
        str(tiny_market),
        "--shards",
        "2",
        "--index-type",
        "Flat",
        "--out",
        str(out),
    ]
    summary = run_job(*args)
    samples = load_market1501(tiny_market).gallery  # junk and distractors included
    assert summary["count"] == len(samples) and summary["skipped"] == 0

    manifest = read_manifest(out)
    assert manifest["num_shards"] == 2 and manifest["index_type"] == "Flat"
    assert manifest["metric"] == "ip" and manifest["dim"] == 96
    assert sum(manifest["counts"]) == len(samples) and min(manifest["counts"]) > 0
    assert manifest["extra"]["checkpoint"] == str(checkpoint.resolve())
    assert manifest["extra"]["format"] == "market1501"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_0", "shard_1"]

    expected = reference_features(checkpoint, samples)  # (N, D) in-process, same transform
    ids = [s.item_id for s in samples]
    assert ids[0].startswith("bounding_box_test/") and ids[0].endswith(".jpg")
    queries = expected[:: max(1, len(ids) // 6)]
    scores = queries @ expected.T  # brute force (Q, N)
    with ShardedIndex.open(out) as index:
        for shard in index.shards:
            assert all(shard_of(i, 2) == shard.shard_id for i in ids if i in shard)
        vectors = np.concatenate([s.get_vectors([i for i in ids if i in s]) for s in index.shards])
        assert vectors.shape == expected.shape
        found, found_ids = index.search(queries, 5)
        assert index.get_metadata([ids[3]]) == [
            {"path": samples[3].path, "pid": samples[3].pid, "camid": samples[3].camid}
        ]
    np.testing.assert_allclose(found, -np.sort(-scores, axis=1)[:, :5], atol=1e-5)
    for row, hit_ids in enumerate(found_ids):
        np.testing.assert_allclose(
            scores[row, [ids.index(i) for i in hit_ids]], found[row], atol=1e-5
        )

    # Same arguments again: the same index, nothing duplicated.
    assert run_job(*args)["counts"] == manifest["counts"]
    with ShardedIndex.open(out) as index:
        again, again_ids = index.search(queries, 5)
        assert index.count == len(samples)
    assert again_ids == found_ids
    np.testing.assert_allclose(again, found, atol=1e-6)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == len(samples)

    # Other settings on the same --out: refused, the index untouched.
    with pytest.raises(SystemExit) as exit_info:
        run_job(*[a if a != "2" else "3" for a in args])
    assert exit_info.value.code == 2
    assert "num_shards 2" in capsys.readouterr().err
    assert read_manifest(out)["counts"] == manifest["counts"]


def test_csv_manifest_ids_extras_corrupt_image_and_ivf(
    ray_session, tiny_market, checkpoint, tmp_path
):
    from reid_platform.retrieval import ShardedIndex, read_manifest

    images = sorted((tiny_market / "bounding_box_test").glob("*.jpg"))[:8]
    (tmp_path / "img").mkdir()
    rows = ["path,pid,camid,split,id,source"]
    for n, image in enumerate(images):
        shutil.copy(image, tmp_path / "img" / image.name)
        split = {0: "train", 1: "query"}.get(n, "gallery")
        rows.append(f"img/{image.name},{n},{n % 2},{split},item-{n},cam{n % 2}")
    (tmp_path / "img" / "broken.jpg").write_bytes(images[0].read_bytes()[:300])
    rows.append("img/broken.jpg,99,0,gallery,item-broken,cam0")
    (tmp_path / "gallery.csv").write_text("\n".join(rows) + "\n")

    out = tmp_path / "index"
    summary = run_job(
        "--checkpoint",
        str(checkpoint),
        "--gallery",
        str(tmp_path / "gallery.csv"),
        "--shards",
        "2",
        "--index-type",
        "IVF2,Flat",
        "--out",
        str(out),
    )
    assert (summary["count"], summary["skipped"], summary["format"]) == (6, 1, "csv")
    assert read_manifest(out)["extra"]["skipped"] == 1
    with ShardedIndex.open(out) as index:
        assert index.index_type == "IVF2,Flat" and index.count == 6
        assert all(f"item-{n}" in index for n in range(2, 8))  # ids from the id column
        assert "item-broken" not in index and "item-0" not in index  # corrupt / train row
        (meta,) = index.get_metadata(["item-4"])
        assert meta["source"] == "cam0" and meta["pid"] == 4
        assert meta["path"] == str(tmp_path / "img" / images[4].name)
        index.set_search_params(nprobe=2)  # both lists: exact
        query = reference_features(checkpoint, _csv_gallery(tmp_path))
        _, hit_ids = index.search(query[:1], 1)
    assert hit_ids == [["item-2"]]


def _csv_gallery(root: Path):
    from reid_platform.retrieval.gallery import gallery_samples

    samples, _ = gallery_samples(root / "gallery.csv")
    return [s for s in samples if s.item_id == "item-2"]


def test_gallery_samples_of_each_format(tiny_market, tmp_path):
    from reid_platform.retrieval.gallery import gallery_samples

    samples, fmt = gallery_samples(tiny_market)
    assert fmt == "market1501" and {s.split for s in samples} == {"gallery"}

    image = next((tiny_market / "query").iterdir()).read_bytes()
    plain = tmp_path / "plain"
    for rel in ("a.jpg", "b.png", "alice/1.jpg", "alice/2.jpg", "bob/x/3.jpg"):
        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
        (plain / rel).write_bytes(image)
    (plain / "notes.txt").write_text("not an image")
    samples, fmt = gallery_samples(plain)
    assert fmt == "folder"
    assert [s.item_id for s in samples] == [
        "a.jpg",
        "alice/1.jpg",
        "alice/2.jpg",
        "b.png",
        "bob/x/3.jpg",
    ]
    assert [s.pid for s in samples] == [-1, 0, 0, -1, 1]
    assert samples[1].meta == {"identity": "alice"} and samples[0].meta == {}

    split = tmp_path / "split"
    for rel in ("train/p1/1.jpg", "train/p1/2.jpg", "query/p2/1.jpg", "gallery/p2/2.jpg"):
        (split / rel).parent.mkdir(parents=True, exist_ok=True)
        (split / rel).write_bytes(image)
    samples, _ = gallery_samples(split)
    assert [s.item_id for s in samples] == ["gallery/p2/2.jpg"]

    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "a.jpg").write_bytes(image)
    (tmp_path / "dup" / "m.csv").write_text(
        "path,pid,camid,split,id\na.jpg,1,0,train,t\na.jpg,1,1,query,q\n"
        "a.jpg,1,0,gallery,same\na.jpg,2,1,gallery,same\n"
    )
    with pytest.raises(DatasetError, match="'same'"):
        gallery_samples(tmp_path / "dup")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        gallery_samples(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not known"):
        gallery_samples(plain, "parquet")


def test_flip_tta_gallery_equals_in_process_flip_embeddings(
    ray_session, tiny_market, checkpoint, tmp_path, capsys
):
    from reid_platform.data.dataset import read_image
    from reid_platform.retrieval import ShardedIndex, read_manifest
    from reid_platform.retrieval.embedders import make_embedder
    from reid_platform.retrieval.gallery import gallery_samples

    out = tmp_path / "index"
    args = ["--checkpoint", str(checkpoint), "--gallery", str(tiny_market), "--out", str(out)]
    summary = run_job(*args, "--tta", "flip")
    assert summary["tta"] == "flip" and read_manifest(out)["extra"]["tta"] == "flip"
    samples, _ = gallery_samples(tiny_market)
    embedder = make_embedder("torch", checkpoint, "cpu")
    expected = embedder.embed([read_image(s.path) for s in samples], flip=True)  # (N, D)
    with ShardedIndex.open(out) as index:
        stored = index.shards[0].get_vectors([s.item_id for s in samples])
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    plain = embedder.embed([read_image(s.path) for s in samples[:3]])
    assert not np.allclose(stored[:3], plain, atol=1e-3)  # flipping changed the embedding
    with pytest.raises(SystemExit):  # the same index without flip: refused, names the field
        run_job(*args)
    assert "tta 'flip' (asked 'none')" in capsys.readouterr().err


def test_flip_augmented_gallery_returns_each_item_once(
    ray_session, tiny_market, checkpoint, tmp_path, capsys
):
    """--augment flip indexes every image's mirror as a second view: k items come back when
    k exist, each once, with its best view's score; a mirrored query finds its item at 1."""
    from reid_platform.data.dataset import read_image
    from reid_platform.retrieval import ShardedIndex, read_manifest
    from reid_platform.retrieval.embedders import make_embedder
    from reid_platform.retrieval.gallery import gallery_samples

    out = tmp_path / "index"
    args = ["--checkpoint", str(checkpoint), "--gallery", str(tiny_market), "--out", str(out)]
    summary = run_job(*args, "--augment", "flip", "--shards", "2")
    assert summary["augment"] == "flip" and read_manifest(out)["extra"]["augment"] == "flip"
    samples, _ = gallery_samples(tiny_market)
    ids = [s.item_id for s in samples]
    embedder = make_embedder("torch", checkpoint, "cpu")
    images = [read_image(s.path) for s in samples]
    plain = embedder.embed(images)  # (N, D)
    mirrored = embedder.embed([np.ascontiguousarray(image[:, ::-1]) for image in images])
    assert summary["count"] == len(samples)
    with ShardedIndex.open(out) as index:
        assert index.count == len(samples)
        assert sum(s["views"] for s in index.stats()["shards"]) == len(samples)
        queries = np.concatenate([plain[:3], mirrored[:3]])  # (6, D)
        scores, found = index.search(queries, len(samples))
        best = np.maximum(queries @ plain.T, queries @ mirrored.T)  # (6, N)
        for q, row in enumerate(found):
            assert sorted(row) == sorted(ids)  # every item, once
            np.testing.assert_allclose(scores[q], np.sort(best[q])[::-1], atol=1e-5)
        for q in range(3):  # the mirrored image's query finds its item through the flip view
            assert found[3 + q][0] == ids[q] and scores[3 + q, 0] == pytest.approx(1, abs=1e-5)
        assert float(plain[0] @ mirrored[0]) < 0.9999  # which the plain view alone would not
    with pytest.raises(SystemExit):  # the same index without augment: refused, names it
        run_job(*args, "--shards", "2")
    assert "augment 'flip' (asked 'none')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_job(*args[:4], "--out", str(tmp_path / "other"), "--augment", "flip", "--tta", "flip")
    assert "--augment flip with --tta flip" in capsys.readouterr().err


def test_onnx_runtime_gallery_equals_onnx_embeddings_and_exports_once(
    ray_session, tiny_market, checkpoint, tmp_path
):
    """--runtime onnx: the checkpoint (whose training data is not recorded) is exported first,
    its parity checked on the gallery; the stored vectors are ONNX Runtime's, within 1e-4 of
    PyTorch's."""
    from reid_platform.checkpoint import load_model, save_checkpoint
    from reid_platform.data.dataset import read_image
    from reid_platform.retrieval import ShardedIndex, read_manifest
    from reid_platform.retrieval.embedders import make_embedder
    from reid_platform.retrieval.export import read_metadata
    from reid_platform.retrieval.gallery import gallery_samples

    model, config = load_model(checkpoint)
    gone = config.replace(**{"data.format": "market1501", "data.root": str(tmp_path / "gone")})
    checkpoint = save_checkpoint(tmp_path / "ck", model, gone, 0)
    onnx_file = checkpoint / "model.onnx"
    out = tmp_path / "index"
    summary = run_job("--checkpoint", str(checkpoint), "--gallery", str(tiny_market), "--out",
                      str(out), "--runtime", "onnx")
    assert summary["runtime"] == "onnx" and read_manifest(out)["extra"]["runtime"] == "onnx"
    meta = read_metadata(onnx_file)
    samples, _ = gallery_samples(tiny_market)
    # Parity on the gallery (the checkpoint's query set is gone), within the fp32 bound.
    assert meta.parity_images == min(64, len(samples)) and meta.parity_max_abs_diff <= 1e-4
    images = [read_image(s.path) for s in samples]
    onnx = make_embedder("onnx", checkpoint, "cpu", 1).embed(images)  # (N, D)
    with ShardedIndex.open(out) as index:
        stored = index.shards[0].get_vectors([s.item_id for s in samples])
    np.testing.assert_allclose(stored, onnx, atol=1e-6, rtol=0)
    np.testing.assert_allclose(stored, make_embedder("torch", checkpoint, "cpu").embed(images),
                               atol=1e-4, rtol=0)
