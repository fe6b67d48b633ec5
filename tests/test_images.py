"""Image sources for diffusion: sklearn's real digits and real PIL files in tmp_path, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from truthgpt.config import DataConfig
from truthgpt.data.images import (
    DIGIT_WORDS,
    collate_images,
    digits_dataset,
    digits_source,
    imagefolder_dataset,
    imagefolder_source,
)
from truthgpt.errors import ConfigError, DataError


def _write_folder(folder: Path, images: dict[str, Image.Image], rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _expected(image: Image.Image) -> torch.Tensor:
    """The reference conversion: PIL's RGB pixels, CHW, mapped from [0, 255] onto [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _stripes(width: int, height: int) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter: tells crops apart."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 4, 0] = 255
    array[:, width // 4 : 3 * width // 4, 1] = 255
    array[:, 3 * width // 4 :, 2] = 255
    return Image.fromarray(array)


# --- digits -----------------------------------------------------------------------------------


def test_digits_items_have_shape_range_and_captions():
    dataset = digits_dataset(size=32, split="all")
    reference = load_digits()
    assert len(dataset) == len(reference.target)
    for index in (0, 7, 1000):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        assert torch.equal(item["pixel_values"][0], item["pixel_values"][2])
        assert item["label"] == int(reference.target[index])
        assert item["text"] == f"a handwritten digit {DIGIT_WORDS[item['label']]}"
    assert digits_dataset(size=16, channels=1)[0]["pixel_values"].shape == (1, 16, 16)
    assert [digits_dataset(split="all")[i]["text"] for i in range(3)] == [
        "a handwritten digit zero",
        "a handwritten digit one",
        "a handwritten digit two",
    ]


def test_digits_at_native_size_are_sklearn_pixels_scaled_to_minus_one_one():
    item = digits_dataset(size=8, split="all", channels=1)[5]
    expected = torch.from_numpy(load_digits().images[5].astype(np.float32)) / 16 * 2 - 1
    torch.testing.assert_close(item["pixel_values"][0], expected)
    # Upsampling averages neighbours: the mean brightness survives it.
    large = digits_dataset(size=64, split="all", channels=1)[5]["pixel_values"]
    assert abs(large.mean().item() - expected.mean().item()) < 0.05


def test_digits_split_is_deterministic_disjoint_and_has_every_class():
    train = digits_dataset(split="train", seed=3)
    val = digits_dataset(split="val", seed=3)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(load_digits().target)))
    assert set(train.labels) == set(val.labels) == set(range(10))
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert digits_dataset(split="val", seed=3).indices == val.indices
    assert digits_dataset(split="val", seed=4).indices != val.indices
    assert len(digits_dataset(split="val", val_fraction=0.2)) > len(val)


def test_digits_refuse_bad_arguments():
    with pytest.raises(DataError, match="split must be one of train, val, all; got 'test'"):
        digits_dataset(split="test")
    with pytest.raises(DataError, match="channels must be 1 or 3, got 2"):
        digits_dataset(channels=2)
    with pytest.raises(DataError, match="image size must be a positive integer, got 0"):
        digits_dataset(size=0)
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        digits_dataset(val_fraction=1.0)


# --- image folders ------------------------------------------------------------------------------


def test_imagefolder_converts_every_mode_to_rgb_in_minus_one_one(tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L")
    palette = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).quantize(8)
    images = {"a.png": rgba, "b.png": grey, "c.png": palette, "d.jpg": _stripes(16, 16)}
    rows = [{"file_name": name, "text": f"image {name}"} for name in images]
    dataset = imagefolder_dataset(_write_folder(tmp_path / "set", images, rows), size=16)
    assert len(dataset) == 4
    for index, name in enumerate(images):
        item = dataset[index]
        assert item["text"] == f"image {name}"
        assert "label" not in item
        assert item["pixel_values"].shape == (3, 16, 16)
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        with Image.open(tmp_path / "set" / name) as on_disk:
            torch.testing.assert_close(item["pixel_values"], _expected(on_disk))


def test_imagefolder_reads_16_bit_grey_at_its_brightness(tmp_path):
    # PIL's convert("RGB") clips a 16-bit grey image (mode I;16) at 255: every pixel brighter
    # than 255/65535 came out white. The reference is the same picture saved with 8 bits.
    wide = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    narrow = Image.fromarray((wide // 257).astype(np.uint8), "L")
    images = {"wide.png": Image.fromarray(wide), "narrow.png": narrow}
    rows = [{"file_name": name, "text": name} for name in images]
    dataset = imagefolder_dataset(_write_folder(tmp_path / "set", images, rows), size=16)
    with Image.open(tmp_path / "set" / "wide.png") as on_disk:
        assert on_disk.mode.startswith("I")  # really read as 16 bits
    torch.testing.assert_close(dataset[0]["pixel_values"], _expected(narrow), rtol=0, atol=0)
    # Floating-point pixels have no fixed range to map: refused, naming the file and its mode.
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "set" / "float.tif")
    _write_folder(tmp_path / "set", {}, [{"file_name": "float.tif", "text": "x"}])
    with pytest.raises(DataError, match=r":1: image '.*float\.tif' has floating-point pixels"):
        imagefolder_dataset(tmp_path / "set", size=8)


def test_imagefolder_refuses_images_without_a_row(tmp_path):
    # An image with no caption row was silently left out of training (datasets' imagefolder
    # refuses it). Other files, hidden ones and a folder with its own metadata.jsonl are not
    # images of this set.
    images = {"a.png": _stripes(8, 8), "b.png": _stripes(8, 8), "c.jpg": _stripes(8, 8)}
    folder = _write_folder(tmp_path / "set", images, [{"file_name": "a.png", "text": "a"}])
    (folder / "notes.txt").write_text("not an image")
    _stripes(8, 8).save(folder / ".hidden.png")
    _write_folder(folder / "val", {"v.png": _stripes(8, 8)}, [{"file_name": "v.png", "text": "v"}])
    with pytest.raises(
        DataError,
        match=r"metadata\.jsonl: 2 image file\(s\) in .*set have no row "
        r'\(b\.png, c\.jpg\).*\{"file_name": "b\.png", "text": ""\} for no caption',
    ):
        imagefolder_dataset(folder, size=8)
    _write_folder(folder, {}, [{"file_name": n, "text": ""} for n in images])
    assert len(imagefolder_dataset(folder, size=8)) == 3


def test_a_single_image_with_a_val_share_names_the_config_key(tmp_path):
    one = _write_folder(
        tmp_path / "one", {"a.png": _stripes(8, 8)}, [{"file_name": "a.png", "text": "a"}]
    )
    data = DataConfig(source="imagefolder", paths=[str(one)], val_fraction=0.25)
    with pytest.raises(ConfigError, match=r"data\.val_fraction: .* 1 image.*data\.val_fraction: 0"):
        imagefolder_source(data, 8, 3, 0)
    train, val = imagefolder_source(data.model_copy(update={"val_fraction": 0.0}), 8, 3, 0)
    assert len(train) == 1 and val is None


def test_digits_for_a_unet_of_other_channels_name_the_unet_key():
    with pytest.raises(ConfigError, match=r"diffusion_training\.unet\.in_channels: .* got 2"):
        digits_source(DataConfig(source="digits"), 16, 2, 0)


def test_imagefolder_resizes_shorter_side_then_center_crops(tmp_path):
    source = _stripes(64, 32)
    folder = _write_folder(tmp_path, {"wide.png": source}, [{"file_name": "wide.png", "text": "w"}])
    item = imagefolder_dataset(folder, size=16)[0]
    reference = source.resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16))
    torch.testing.assert_close(item["pixel_values"], _expected(reference))
    # The center half of the stripes is pure green: no red or blue edge survives the crop.
    at_size = imagefolder_dataset(folder, size=32)[0]["pixel_values"]
    torch.testing.assert_close(at_size, _expected(source.crop((16, 0, 48, 32))))
    assert torch.all(at_size[1] == 1.0) and torch.all(at_size[0] == -1.0)


def test_imagefolder_random_crop_picks_windows_of_the_image(tmp_path):
    source = _stripes(48, 16)
    folder = _write_folder(tmp_path, {"s.png": source}, [{"file_name": "s.png", "text": "s"}])
    dataset = imagefolder_dataset(folder, size=16, center_crop=False)
    windows = [_expected(source.crop((left, 0, left + 16, 16))) for left in range(48 - 16 + 1)]
    torch.manual_seed(0)
    lefts = set()
    for _ in range(30):
        crop = dataset[0]["pixel_values"]
        matches = [left for left, window in enumerate(windows) if torch.equal(crop, window)]
        assert matches, "a random crop must be a 16x16 window of the resized image"
        lefts.add(matches[0])
    assert len(lefts) > 5


def test_imagefolder_random_flip_mirrors_about_half_the_time(tmp_path):
    source = _stripes(16, 16)
    folder = _write_folder(tmp_path, {"s.png": source}, [{"file_name": "s.png", "text": "s"}])
    original = _expected(source)
    mirrored = torch.flip(original, dims=[2])
    torch.manual_seed(0)
    flipping = imagefolder_dataset(folder, size=16, random_flip=True)
    draws = [flipping[0]["pixel_values"] for _ in range(40)]
    flips = sum(torch.equal(draw, mirrored) for draw in draws)
    assert flips + sum(torch.equal(draw, original) for draw in draws) == 40
    assert 8 < flips < 32
    steady = imagefolder_dataset(folder, size=16)
    assert all(torch.equal(steady[0]["pixel_values"], original) for _ in range(10))


def test_imagefolder_split_is_deterministic_and_disjoint(tmp_path):
    images = {f"{i}.png": _stripes(8, 8) for i in range(20)}
    rows = [{"file_name": name, "text": name} for name in images]
    folder = _write_folder(tmp_path, images, rows)
    every = [item["text"] for item in imagefolder_dataset(folder, 8)]
    train = [item["text"] for item in imagefolder_dataset(folder, 8, split="train", seed=1)]
    val = [item["text"] for item in imagefolder_dataset(folder, 8, split="val", seed=1)]
    assert len(val) == 2 and set(train).isdisjoint(val) and sorted(train + val) == sorted(every)
    assert val == [item["text"] for item in imagefolder_dataset(folder, 8, split="val", seed=1)]


BAD_ROWS = [
    ({"text": "no name"}, r"metadata\.jsonl:2: row has no 'file_name'"),
    ({"file_name": "a.png"}, r"metadata\.jsonl:2: row has no 'text'"),
    ({"file_name": "../outside.png", "text": "x"}, r":2: file_name '\.\./outside\.png' is not a"),
    ({"file_name": "sub/../../outside.png", "text": "x"}, r":2: file_name 'sub/\.\./\.\./outs"),
    ({"file_name": "ABSOLUTE", "text": "x"}, r":2: file_name '/.*outside\.png' is not a relative"),
    ({"file_name": "C:/outside.png", "text": "x"}, r":2: file_name 'C:/outside\.png' is not a"),
    ({"file_name": "", "text": "x"}, r":2: file_name '' is not a relative path"),
    ({"file_name": 3, "text": "x"}, r":2: file_name must be a string, got 3"),
    (
        {"file_name": "gone.png", "text": "x"},
        r"metadata\.jsonl:2: image '.*gone\.png' does not exist",
    ),
    (
        {"file_name": "broken.png", "text": "x"},
        r"metadata\.jsonl:2: cannot read image '.*broken\.png'",
    ),
    ('{"file_name": "a.png", ', r"metadata\.jsonl:2: not valid JSON"),
    ('["a.png", "x"]', r"metadata\.jsonl:2: a row must be a JSON object"),
]


@pytest.mark.parametrize(("bad_row", "message"), BAD_ROWS)
def test_imagefolder_bad_rows_name_the_row_and_file(tmp_path, bad_row, message):
    _stripes(8, 8).save(tmp_path / "outside.png")  # exists, so refusal is not just "missing"
    folder = tmp_path / "set"
    if isinstance(bad_row, dict) and bad_row.get("file_name") == "ABSOLUTE":
        bad_row = {**bad_row, "file_name": str(tmp_path / "outside.png")}
    _write_folder(
        folder, {"a.png": _stripes(8, 8)}, [{"file_name": "a.png", "text": "ok"}, bad_row]
    )
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=message):
        imagefolder_dataset(folder, size=8)


def test_imagefolder_refuses_a_symlink_out_of_the_folder(tmp_path):
    _stripes(8, 8).save(tmp_path / "outside.png")
    folder = _write_folder(tmp_path / "set", {}, [{"file_name": "link.png", "text": "x"}])
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match=r":1: file_name 'link\.png' is not a relative path inside"):
        imagefolder_dataset(folder, size=8)


def test_imagefolder_refuses_missing_folder_metadata_and_empty_sets(tmp_path):
    with pytest.raises(DataError, match=r"image folder '.*nowhere' does not exist"):
        imagefolder_dataset(tmp_path / "nowhere", size=8)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"bare has no metadata\.jsonl: add one JSON line"):
        imagefolder_dataset(tmp_path / "bare", size=8)
    empty = _write_folder(tmp_path / "empty", {}, ["", "  "])
    with pytest.raises(DataError, match=r"metadata\.jsonl lists no image"):
        imagefolder_dataset(empty, size=8)
    one = _write_folder(
        tmp_path / "one", {"a.png": _stripes(8, 8)}, [{"file_name": "a.png", "text": "a"}]
    )
    with pytest.raises(DataError, match=r"split 'val' is empty \(1 rows"):
        imagefolder_dataset(one, size=8, split="val")


# --- batches ------------------------------------------------------------------------------------


def test_dataloader_with_collate_yields_batches(tmp_path):
    loader = DataLoader(
        digits_dataset(size=16, split="val"), batch_size=8, collate_fn=collate_images
    )
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert batch["label"].shape == (8,) and batch["label"].dtype == torch.int64
    assert batch["text"] == [f"a handwritten digit {DIGIT_WORDS[int(n)]}" for n in batch["label"]]

    images = {f"{i}.png": _stripes(20, 12) for i in range(5)}
    folder = _write_folder(tmp_path, images, [{"file_name": n, "text": n} for n in images])
    dataset = imagefolder_dataset(folder, size=12, random_flip=True)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_images))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 12, 12)] * 2 + [(1, 3, 12, 12)]
    assert batches[0]["text"] == ["0.png", "1.png"] and batches[0]["label"] is None
