"""Image sources for diffusion training: captioned images as [C, H, W] tensors in [-1, 1].

Two sources, each a torch `Dataset` of `{"pixel_values": Tensor, "text": str}` items (digits add
`"label": int`), and `collate_images` to batch them:

- `digits_dataset`: scikit-learn's bundled 8x8 handwritten digits (no download), upsampled and
  captioned "a handwritten digit seven". The offline default of DESIGN.md.
- `imagefolder_dataset`: the diffusers / `datasets` imagefolder convention, image files next to a
  `metadata.jsonl` whose rows hold `file_name` and `text`.

Pixels are scaled to [-1, 1] because that is the range SD-style VAEs and UNets are trained on
(diffusers' train_text_to_image normalizes with mean 0.5, std 0.5).
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from truthgpt.config import DataConfig
from truthgpt.errors import ConfigError, DataError
from truthgpt.registry import IMAGE_SOURCES

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "all")
METADATA_FILE = "metadata.jsonl"
# PIL's grey modes of more than 8 bits: I;16* (16-bit PNG and TIFF files) and I (32-bit integers,
# the mode older Pillows opened 16-bit PNGs in); both are read as 0..65535 (Pillow issue #3011).
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def digit_caption(label: int) -> str:
    """The caption of a digit image: 'a handwritten digit seven'."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def _check_common(size: int, split: str, val_fraction: float) -> None:
    if not isinstance(size, int) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def _val_count(n: int, val_fraction: float) -> int:
    # At least one val item whenever val is asked for and there are two items to share,
    # and never all of them: both sides stay non-empty.
    if val_fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(n * val_fraction)), n - 1)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits, upsampled to `size` x `size` on access."""

    def __init__(
        self, images: torch.Tensor, labels: list[int], indices: list[int], size: int, channels: int
    ):
        self.images = images  # [N, 1, 8, 8], already in [-1, 1]
        self.labels = labels
        self.indices = indices  # rows of sklearn's load_digits(), to tell splits apart
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def captions(self) -> list[str]:
        """Every item's caption, in order, without touching the pixels."""
        return [digit_caption(label) for label in self.labels]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index : index + 1]
        if self.size != image.shape[-1]:
            # Bilinear (not bicubic) keeps values inside [-1, 1]: it only averages neighbours.
            image = F.interpolate(
                image, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        pixel_values = image[0].expand(self.channels, -1, -1).contiguous()
        label = self.labels[index]
        return {"pixel_values": pixel_values, "text": digit_caption(label), "label": label}


def digits_dataset(
    size: int = 32,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
    channels: int = 3,
) -> DigitsDataset:
    """The 1,797 bundled handwritten digits as captioned images in [-1, 1].

    split: "train", "val" or "all". The split is stratified by digit and depends only on
        `seed` and `val_fraction`, so every digit is on both sides and train and val never
        share an image.
    channels: 3 (grey repeated, what SD-style VAEs and UNets take) or 1.
    """
    _check_common(size, split, val_fraction)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits image set is scikit-learn's: pip install scikit-learn"
        ) from None
    digits = load_digits()
    # Pixel values are integers 0..16 (ink = high); map them linearly onto [-1, 1].
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = [int(label) for label in digits.target]

    indices = list(range(len(labels)))
    if split != "all":
        generator = torch.Generator().manual_seed(seed)
        val: set[int] = set()
        for digit in range(10):
            members = [i for i in indices if labels[i] == digit]
            order = torch.randperm(len(members), generator=generator).tolist()
            val.update(members[j] for j in order[: _val_count(len(members), val_fraction)])
        indices = [i for i in indices if (i in val) == (split == "val")]
    return DigitsDataset(images[indices], [labels[i] for i in indices], indices, size, channels)


class ImageFolderDataset(Dataset):
    """Captioned image files, loaded, resized and cropped on access."""

    def __init__(
        self,
        rows: list[tuple[Path, str, int]],
        metadata: Path,
        size: int,
        center_crop: bool,
        random_flip: bool,
    ):
        self.rows = rows  # (image path, caption, 1-based line in metadata.jsonl)
        self.metadata = metadata
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str]:
        """Every item's caption, in order, without loading an image."""
        return [text for _, text, _ in self.rows]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, text, line = self.rows[index]
        image = _load_rgb(path, self.metadata, line)
        image = _resize_shorter_side(image, self.size)
        image = _crop(image, self.size, self.center_crop)
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        return {"pixel_values": pixels.permute(2, 0, 1) / 127.5 - 1.0, "text": text}


def _load_rgb(path: Path, metadata: Path, line: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            if image.mode in WIDE_GREY_MODES:
                # convert("RGB") clips 16-bit grey at 255, so all but the darkest pixels came
                # out white; map 0..65535 onto 0..255 instead (255 x 257 = 65535).
                grey = np.asarray(image).astype(np.int64) // 257
                return Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L").convert("RGB")
            # RGBA and P images are flattened to RGB; the alpha channel is dropped.
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{metadata}:{line}: image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{metadata}:{line}: cannot read image {str(path)!r} ({exc})") from None


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _crop(image: Image.Image, size: int, center: bool) -> Image.Image:
    width, height = image.size
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left = int(torch.randint(0, width - size + 1, ()).item())
        top = int(torch.randint(0, height - size + 1, ()).item())
    return image.crop((left, top, left + size, top + size))


def _inside(folder: Path, file_name: str) -> Path | None:
    """The file's path when `file_name` is relative and stays inside `folder`, else None."""
    # A Windows anchor ("C:", "\\server", "\\x") is refused too: the same metadata.jsonl
    # must not escape the folder on any platform.
    if Path(file_name).is_absolute() or PureWindowsPath(file_name).anchor:
        return None
    path = (folder / file_name).resolve()
    return path if path.is_relative_to(folder) else None


def _read_metadata(folder: Path, metadata: Path) -> list[tuple[Path, str, int]]:
    rows = []
    with metadata.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object with file_name and text")
            for key in ("file_name", "text"):
                if key not in row:
                    raise DataError(f"{where}: row has no {key!r} (a row needs file_name and text)")
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: {key} must be a string, got {row[key]!r}")
            file_name = row["file_name"]
            path = _inside(folder, file_name) if file_name.strip() else None
            if path is None:
                raise DataError(
                    f"{where}: file_name {file_name!r} is not a relative path inside {folder}"
                )
            rows.append((path, row["text"], line_number))
    return rows


def imagefolder_dataset(
    folder: str | Path,
    size: int,
    center_crop: bool = True,
    random_flip: bool = False,
    split: str = "all",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> ImageFolderDataset:
    """Images listed in `folder/metadata.jsonl` (rows `{"file_name": ..., "text": ...}`).

    Each image becomes RGB, its shorter side is resized to `size`, it is cropped to `size` x
    `size` (centered, or at a random place with center_crop=False) and, with random_flip,
    mirrored left-right half of the time. Random choices use torch's global RNG.
    split: "all" (default: fine-tuning sets are small), or "train" / "val", a shuffle by `seed`
        with `val_fraction` of the rows on the val side.
    Every row and image is checked here, so a bad file fails before training starts.
    """
    _check_common(size, split, val_fraction)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist or is not a folder")
    folder = folder.resolve()
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise DataError(
            f"{folder} has no {METADATA_FILE}: add one JSON line per image, "
            '{"file_name": "a.png", "text": "a caption"}'
        )
    rows = _read_metadata(folder, metadata)
    if not rows:
        raise DataError(f"{metadata} lists no image: add a row per image with file_name and text")
    for path, _, line in rows:
        _verify_image(path, metadata, line)
    unlisted = sorted(_image_files(folder) - {path for path, _, _ in rows})
    if unlisted:
        names = [str(path.relative_to(folder)) for path in unlisted]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DataError(
            f"{metadata}: {len(names)} image file(s) in {folder} have no row ({shown}), so they "
            f'would not be trained on: add a row for each ({{"file_name": {json.dumps(names[0])}, '
            '"text": ""} for no caption), or move them out of the folder'
        )

    if split != "all":
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        val = set(order[: _val_count(len(rows), val_fraction)])
        rows = [row for i, row in enumerate(rows) if (i in val) == (split == "val")]
        if not rows:
            raise DataError(
                f"{metadata}: split {split!r} is empty ({len(order)} rows, "
                f"val_fraction={val_fraction}); use split='all' or add images"
            )
    return ImageFolderDataset(rows, metadata, size, center_crop, random_flip)


def _image_files(folder: Path) -> set[Path]:
    """The image files under `folder` (by the extensions PIL opens), resolved as `_inside`
    resolves rows. Not counted: hidden files, linked folders (a link may loop) and folders with
    a metadata.jsonl of their own (another set, such as a val folder inside)."""
    Image.init()
    extensions = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    found = set()
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not path.is_symlink() and not (path / METADATA_FILE).is_file():
                found |= _image_files(path)
        elif path.suffix.lower() in extensions:
            found.add(path.resolve())
    return found


def _verify_image(path: Path, metadata: Path, line: int) -> None:
    if not path.is_file():
        raise DataError(f"{metadata}:{line}: image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.verify()  # reads the header and checks the file's structure, decodes nothing
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{metadata}:{line}: cannot read image {str(path)!r} ({exc})") from None
    if mode == "F":
        raise DataError(
            f"{metadata}:{line}: image {str(path)!r} has floating-point pixels (PIL mode F), "
            "whose range is not known; save it as an 8- or 16-bit image"
        )


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into `{"pixel_values": [B, C, H, W], "text": [...], "label": [B] or None}`.

    `label` is a tensor only when every item has one (digits); image folders have none.
    """
    labels = [item.get("label") for item in items]
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "text": [item["text"] for item in items],
        "label": None if any(label is None for label in labels) else torch.tensor(labels),
    }


# ---------------------------------------------------------------------------------------------
# `data.source` builders for task image-generation: (DataConfig, size, channels, seed, crop and
# flip settings) -> (train, val or None).

ImageSplits = tuple[Dataset, Dataset | None]


@IMAGE_SOURCES.register("digits")
def digits_source(
    data: DataConfig,
    size: int,
    channels: int,
    seed: int,
    center_crop: bool = True,
    random_flip: bool = False,
) -> ImageSplits:
    """The bundled digits, split by `data.val_fraction` (digits are never cropped or flipped:
    a mirrored 7 is no digit)."""
    if channels not in (1, 3):
        raise ConfigError(
            "diffusion_training.unet.in_channels: the digits are grey images, 1 channel (or 3, "
            f"the grey repeated); got {channels}"
        )
    val = (
        digits_dataset(size, "val", data.val_fraction, seed, channels)
        if data.val_fraction > 0
        else None
    )
    split = "train" if val is not None else "all"
    return digits_dataset(size, split, data.val_fraction, seed, channels), val


@IMAGE_SOURCES.register("imagefolder")
def imagefolder_source(
    data: DataConfig,
    size: int,
    channels: int,
    seed: int,
    center_crop: bool = True,
    random_flip: bool = False,
) -> ImageSplits:
    """`data.paths`: one folder with metadata.jsonl; val is `data.val_paths` (one folder) or a
    `data.val_fraction` share of it. Images are RGB, so `channels` must be 3."""
    if len(data.paths) != 1:
        raise ConfigError(
            f"data.paths: source imagefolder reads exactly one folder with {METADATA_FILE}, "
            f"got {len(data.paths)} paths ({data.paths!r})"
        )
    if len(data.val_paths) > 1:
        raise ConfigError(
            f"data.val_paths: source imagefolder takes at most one val folder, got {data.val_paths}"
        )
    if channels != 3:
        raise ConfigError(
            f"diffusion_training: source imagefolder gives RGB images, but the model takes "
            f"{channels} channel(s); use a UNet (or VAE) with 3 input channels"
        )
    crop = dict(size=size, center_crop=center_crop, random_flip=random_flip)
    if data.val_paths:
        train = imagefolder_dataset(data.paths[0], **crop)
        # Validation images are always center-cropped and never flipped: the same every time.
        return train, imagefolder_dataset(data.val_paths[0], size)
    if data.val_fraction == 0:
        return imagefolder_dataset(data.paths[0], **crop), None
    split = dict(val_fraction=data.val_fraction, seed=seed)
    train = imagefolder_dataset(data.paths[0], **crop, split="train", **split)
    if len(train) < 2:  # the split keeps every image on the train side: val would be empty
        raise ConfigError(
            f"data.val_fraction: {data.val_fraction} holds out a share of {data.paths[0]}, which "
            f"has {len(train)} image; set data.val_fraction: 0 (no validation), give "
            "data.val_paths, or add images"
        )
    return train, imagefolder_dataset(data.paths[0], size, split="val", **split)
