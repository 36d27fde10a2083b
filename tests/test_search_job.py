"""jobs/search.py: offline batch retrieval with Ray Data equals the index searched with
in-process embeddings; boxes crop what they say; label votes; corrupt queries are skipped and
listed; bad box files name the line."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from reid_platform.data.formats import DatasetError
from reid_platform.retrieval.batch_search import label_vote, read_boxes


def test_label_vote_is_score_weighted():
    metadata = [{"class": "a"}, {"class": "b"}, {"class": "b"}, {"class": "a"}, {"other": 1}]
    label, share = label_vote([0.9, 0.8, 0.3, -0.2, 5.0], metadata, "class")
    assert label == "b" and share == pytest.approx(1.1 / 2.0)  # a: 0.9 (+0), b: 1.1
    assert label_vote([0.5], [{"x": 1}], "class") == (None, 0.0)
    assert label_vote([0.4, 0.6], [{"c": [1]}, {"c": [1]}], "c") == ([1], 1.0)


def test_bad_box_files_name_the_line(tmp_path):
    for body, message in [
        ("image,x,y,w\na.jpg,1,2,3\n", "columns \\['h'\\] are missing"),
        ("image,x,y,w,h\na.jpg,1,2,3,four\n", "boxes.csv:2: box x,y,w,h must be numbers"),
        ("image,x,y,w,h\na.jpg,1,2,3,4\na.jpg,1,2,0,4\n", "boxes.csv:3: .* w, h > 0"),
        ("image,x,y,w,h\na.jpg,-1,2,3,4\n", "boxes.csv:2: .* outside"),
        ("image,x,y,w,h\na.jpg,inf,2,3,4\n", "boxes.csv:2: .* finite"),
    ]:
        (tmp_path / "boxes.csv").write_text(body)
        with pytest.raises(DatasetError, match=message):
            read_boxes(tmp_path / "boxes.csv", tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_market):
    """A checkpoint and a 2-shard index of the tiny gallery, embedded in-process."""
    from reid_platform.checkpoint import load_model, save_checkpoint
    from reid_platform.config import Config
    from reid_platform.evaluation.embed import extract_features
    from reid_platform.models import build_model
    from reid_platform.retrieval import ShardedIndex
    from reid_platform.retrieval.gallery import gallery_samples, sample_metadata

    root = tmp_path_factory.mktemp("search-job")
    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    checkpoint = save_checkpoint(root / "ckpt", build_model(config.model, 12), config, 0)
    model, _ = load_model(checkpoint)
    samples, _ = gallery_samples(tiny_market)
    feats = extract_features(model, samples, 64, 32).feats
    with ShardedIndex.create(
        root / "index", feats.shape[1], 2, extra={"checkpoint": str(checkpoint)}
    ) as index:
        index.add([s.item_id for s in samples], feats, [sample_metadata(s) for s in samples])
    return {"checkpoint": checkpoint, "index": root / "index", "model": model}


def run_job(*args: str) -> dict:
    import search

    return search.main([*args, "--workers", "1", "--batch-size", "16", "--no-progress"])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # Ray Data actor pools
def test_search_job_equals_the_index_over_in_process_embeddings(
    ray_session, built, tiny_market, tmp_path, capsys
):
    from reid_platform.data.formats import load_market1501
    from reid_platform.evaluation.embed import extract_features
    from reid_platform.retrieval import ShardedIndex

    data = tmp_path / "market"
    shutil.copytree(tiny_market, data)
    good = sorted((data / "query").iterdir())[0]
    (data / "query" / "0099_c1s1_000001_01.jpg").write_bytes(good.read_bytes()[:200])
    summary = run_job(
        "--index",
        str(built["index"]),
        "--queries",
        str(data),
        "--k",
        "5",
        "--out",
        str(tmp_path / "results.csv"),
    )
    queries = [
        q for q in load_market1501(data).query if not q.path.endswith("0099_c1s1_000001_01.jpg")
    ]
    assert summary["skipped"] == 1 and summary["searched"] == len(queries)
    assert "0099_c1s1_000001_01.jpg" in capsys.readouterr().out  # the skipped one is listed
    rows = read_rows(tmp_path / "results.csv")
    assert len(rows) == 5 * len(queries)
    feats = extract_features(built["model"], queries, 64, 32).feats
    with ShardedIndex.open(built["index"]) as index:
        scores, ids = index.search(feats, 5)
    for q, sample in enumerate(queries):
        mine = [r for r in rows if r["query_id"] == sample.item_id]
        assert [r["id"] for r in mine] == ids[q]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([float(r["score"]) for r in mine], scores[q], atol=1e-5)


@pytest.mark.slow
def test_boxes_crop_what_they_say_and_vote_labels(ray_session, built, tiny_market, tmp_path):
    import torch

    from reid_platform.data.dataset import read_image
    from reid_platform.data.transforms import build_eval_transform
    from reid_platform.retrieval import ShardedIndex

    image = sorted((tiny_market / "bounding_box_test").glob("*.jpg"))[3]
    rel = image.relative_to(tiny_market).as_posix()
    boxes = [(0, 0, 32, 32), (0, 32, 32, 32), (4, 8, 20, 40)]  # top, bottom, middle (x,y,w,h)
    (tmp_path / "boxes.csv").write_text(
        "image,x,y,w,h,box_id\n"
        + "".join(f"{rel},{x},{y},{w},{h},b{n}\n" for n, (x, y, w, h) in enumerate(boxes))
    )
    run_job(
        "--index",
        str(built["index"]),
        "--queries",
        str(tiny_market),
        "--boxes",
        str(tmp_path / "boxes.csv"),
        "--k",
        "4",
        "--label-key",
        "pid",
        "--out",
        str(tmp_path / "r.csv"),
    )
    rows = read_rows(tmp_path / "r.csv")
    transform = build_eval_transform(64, 32)
    crops = torch.stack([transform(image=read_image(image, b))["image"] for b in boxes])
    with torch.inference_mode():
        feats = built["model"].embed(crops).numpy()  # the crops, embedded here
    with ShardedIndex.open(built["index"]) as index:
        scores, ids, metadata = index.search_with_metadata(feats, 4)
    for n, box in enumerate(boxes):
        mine = [r for r in rows if r["query_id"] == f"b{n}"]
        assert [(int(mine[0][c])) for c in "xywh"] == list(box)
        assert [r["id"] for r in mine] == ids[n]
        np.testing.assert_allclose([float(r["score"]) for r in mine], scores[n], atol=1e-5)
        label, share = label_vote(scores[n], metadata[n], "pid")
        assert mine[0]["label"] == str(label) and float(mine[0]["label_score"]) == pytest.approx(
            share, abs=1e-4
        )
