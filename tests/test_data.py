"""Datasets: image folder, JSONL, COCO captions (each on a tiny set written here, with
missing and corrupt files), the synthetic shapes set, and collation that skips bad images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import data

R = 16


def write_image(path, size=(40, 24), colour=(200, 30, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def load_all(ds):
    return data.collate([ds[i] for i in range(len(ds))])


def test_image_folder_captions_from_class_names_and_skips_corrupt(tmp_path):
    write_image(tmp_path / "red_apple" / "a.png")
    write_image(tmp_path / "red_apple" / "b.jpg", size=(24, 40))
    write_image(tmp_path / "sky" / "c.png", colour=(10, 20, 250))
    write_corrupt(tmp_path / "sky" / "broken.png")
    (tmp_path / "sky" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, R)
    assert len(ds) == 4
    batch = load_all(ds)
    assert batch["text"] == ["red apple", "red apple", "sky"]
    assert [s.source.endswith("broken.png") for s in batch["skipped"]] == [True]
    assert "unreadable image" in batch["skipped"][0].reason
    assert batch["image"].shape == (3, 3, R, R) and batch["image"].dtype == torch.float32
    # a solid colour survives resize + crop exactly: value = c / 127.5 − 1
    want = torch.tensor([200, 30, 90]) / 127.5 - 1
    torch.testing.assert_close(batch["image"][0].mean((1, 2)), want, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope", R)


def test_jsonl_skips_missing_files_and_bad_lines(tmp_path):
    write_image(tmp_path / "imgs" / "one.png")
    write_corrupt(tmp_path / "imgs" / "two.png")
    lines = [
        json.dumps({"image": "imgs/one.png", "text": "first"}),
        json.dumps({"image": "imgs/two.png", "text": "corrupt"}),
        json.dumps({"image": "imgs/missing.png", "text": "missing"}),
        "{not json",
        json.dumps({"image": "imgs/one.png"}),
        "",
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    ds = data.JsonlCaptions(tmp_path / "captions.jsonl", R)
    assert len(ds) == 2
    reasons = sorted(s.reason.split(" ")[0] for s in ds.skipped)
    assert reasons == ["bad", "bad", "missing"]
    batch = load_all(ds)
    assert batch["text"] == ["first"] and len(batch["skipped"]) == 1
    summary = data.report(ds.skipped + batch["skipped"])
    assert summary.startswith("4 example(s) skipped")


def test_jsonl_line_that_is_not_utf8_is_skipped_naming_file_and_line(tmp_path):
    write_image(tmp_path / "one.png")
    good = json.dumps({"image": "one.png", "text": "first"}).encode()
    latin1 = '{"image": "one.png", "text": "caf\xe9"}'.encode("latin-1")  # é as one byte: not UTF-8
    (tmp_path / "c.jsonl").write_bytes(good + b"\n" + latin1 + b"\n" + good + b"\n")
    ds = data.JsonlCaptions(tmp_path / "c.jsonl", R)
    assert len(ds) == 2
    assert [(s.source, s.reason) for s in ds.skipped] == [(f"{tmp_path / 'c.jsonl'}:2", "bad record (not UTF-8 text)")]


def test_coco_captions_one_example_per_caption(tmp_path):
    write_image(tmp_path / "val" / "000001.jpg")
    write_image(tmp_path / "val" / "000002.jpg", colour=(0, 255, 0))
    ann = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"},
                   {"id": 3, "file_name": "gone.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a cat "}, {"id": 11, "image_id": 1, "caption": "cat"},
                        {"id": 12, "image_id": 2, "caption": "green"}, {"id": 13, "image_id": 3, "caption": "x"},
                        {"id": 14, "image_id": 99, "caption": "y"}],
    }  # fmt: skip
    (tmp_path / "captions_val.json").write_text(json.dumps(ann))
    ds = data.CocoCaptions(tmp_path / "captions_val.json", tmp_path / "val", R)
    assert len(ds) == 3 and len(ds.skipped) == 2
    assert load_all(ds)["text"] == ["a cat", "cat", "green"]
    assert isinstance(data.open_dataset(f"coco:{tmp_path / 'captions_val.json'}:{tmp_path / 'val'}", R), data.CocoCaptions)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shapes"):
        data.open_dataset(str(tmp_path / "nothing"), R)
    with pytest.raises(ValueError, match="coco:"):
        data.open_dataset("coco:only-one-part", R)
    with pytest.raises(ValueError, match="resolution"):
        data.ShapesDataset(resolution=4)


def test_shapes_are_deterministic_and_match_their_captions():
    ds = data.ShapesDataset(resolution=32, length=1000, seed=5)
    a, b = ds[17], data.ShapesDataset(resolution=32, length=1000, seed=5)[17]
    assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
    assert not torch.equal(a["image"], data.ShapesDataset(resolution=32, length=1000, seed=6)[17]["image"])
    item = ds[3]
    assert item["text"] == data.caption(item["colour"], item["shape"], item["size"], item["position"])
    assert data.parse_caption(item["text"]) == {k: item[k] for k in ("colour", "shape", "size", "position")}
    img = item["image"]
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    # the background colour fills the corners far from every shape position
    corner = np.asarray(data.to_pil(img))[0, 0] if item["position"] != "at the top left" else None
    if corner is not None:
        assert tuple(corner) == data.BACKGROUND
    assert len(set(data.all_captions())) == len(data.COLOURS) * len(data.SHAPES) * len(data.SIZES) * len(data.POSITIONS)
    with pytest.raises(IndexError):
        ds[1000]


def test_collate_of_only_bad_examples():
    batch = data.collate([{"skipped": data.Skipped("x.png", "unreadable image")}])
    assert batch["text"] == [] and batch["image"].numel() == 0 and len(batch["skipped"]) == 1
