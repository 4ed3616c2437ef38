"""Captioned image datasets: image folders, JSONL, MS-COCO captions, and a synthetic shapes set.

Every dataset yields ``{"image": (3, R, R) float32 in [−1, 1], "text": str}``
(R = ``resolution``: the shorter side is resized to R, then centre-cropped).

A missing or unreadable image never stops training: files that do not exist are
dropped when the dataset is built, files that fail to decode are dropped when a
batch is collated (`collate`); both are counted in ``dataset.skipped`` /
``batch["skipped"]`` with the reason, and `report` summarises them.

`ShapesDataset` is the synthetic set the shipped model is trained on: one coloured
shape per image, described by its caption, e.g. "a small red circle at the top
left".  Image i is a pure function of (seed, i), so it needs no files.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image datasets need Pillow: pip install pillow") from e
    return Image


def to_tensor(img) -> torch.Tensor:
    """PIL image (RGB) → (3, H, W) float32 in [−1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor):
    """(3, H, W) float in [−1, 1] → PIL RGB image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return _pil().fromarray(arr)


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """Decode, convert to RGB, resize the shorter side to ``resolution`` and centre-crop."""
    with _pil().open(path) as img:
        return to_tensor(fit_image(img.convert("RGB"), resolution))


def fit_image(img, resolution: int):
    """A PIL image with its shorter side resized to ``resolution`` (bicubic), centre-cropped to a square."""
    Image = _pil()
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def open_image(source, what: str = "image"):
    """A PIL RGB image from a PIL image or a path; a missing or undecodable file is refused naming ``what``."""
    Image = _pil()
    from PIL import UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a PIL image, a path or a tensor, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:  # not an image, truncated, unsupported mode
        raise ValueError(f"{what} {str(path)!r} is not a readable image ({type(e).__name__})") from None


def read_lines(path: str | os.PathLike) -> list[tuple[int, str | None]]:
    """(line number from 1, text) for each line of a file; text is None for a line that is not UTF-8.

    Decoding line by line lets a reader name the one bad line (or skip it) instead of failing
    on the whole file.  A UTF-8 byte-order mark at the start is dropped.
    """
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError:
            lines.append((n, None))
    return lines


def read_text_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """`read_lines` for a file every line of which must be text: a line that is not UTF-8 is a
    ValueError naming the file and the line."""
    lines = read_lines(path)
    undecodable = next((n for n, line in lines if line is None), None)
    if undecodable is not None:
        raise ValueError(f"{path}, line {undecodable}: not UTF-8 text")
    return lines


@dataclass
class Skipped:
    """An example left out, and why."""

    source: str
    reason: str


class CaptionedFiles(Dataset):
    """(image path, caption) pairs; the base of the file-backed datasets."""

    def __init__(self, items: list[tuple[str, str]], resolution: int, skipped: list[Skipped] | None = None):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.resolution = resolution
        self.skipped = list(skipped or [])
        self.items = []
        for path, text in items:
            if os.path.isfile(path):
                self.items.append((path, text))
            else:
                self.skipped.append(Skipped(path, "missing file"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, text = self.items[i]
        try:
            return {"image": load_image(path, self.resolution), "text": text}
        except Exception as e:  # any decoder failure: truncated, not an image, unsupported mode ...
            return {"skipped": Skipped(path, f"unreadable image ({type(e).__name__}: {e})")}


class ImageFolder(CaptionedFiles):
    """``root/<class name>/<image>``: the caption is the class name, underscores as spaces."""

    def __init__(self, root: str | os.PathLike, resolution: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        items = []
        for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            text = cls_dir.name.replace("_", " ")
            for f in sorted(cls_dir.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(f), text))
        if not items:
            raise ValueError(f"image folder {str(root)!r} has no images in class sub-folders")
        super().__init__(items, resolution)


class JsonlCaptions(CaptionedFiles):
    """One JSON object per line, ``{"image": path, "text": caption}``; relative paths are
    relative to the file's folder (or ``image_root``).  Malformed lines — including a line
    that is not UTF-8 text — are skipped and listed in ``skipped`` as ``<file>:<line>``."""

    def __init__(self, path: str | os.PathLike, resolution: int, image_root: str | os.PathLike | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist")
        root = Path(image_root) if image_root is not None else path.parent
        items, skipped = [], []
        for n, line in read_lines(path):
            if line is None:
                skipped.append(Skipped(f"{path}:{n}", "bad record (not UTF-8 text)"))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, text = rec["image"], rec["text"]
                if not isinstance(image, str) or not isinstance(text, str):
                    raise TypeError("image and text must be strings")
            except (ValueError, KeyError, TypeError) as e:
                skipped.append(Skipped(f"{path}:{n}", f"bad record ({type(e).__name__}: {e})"))
                continue
            items.append((str(root / image), text))
        super().__init__(items, resolution, skipped)


class CocoCaptions(CaptionedFiles):
    """MS-COCO captions (Chen et al. 2015): ``captions_*.json`` and its image folder; one example per caption."""

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike, resolution: int):
        annotations, image_dir = Path(annotations), Path(image_dir)
        if not annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file {str(annotations)!r} does not exist")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {str(image_dir)!r} does not exist")
        data = json.loads(annotations.read_text())
        files = {img["id"]: img["file_name"] for img in data.get("images", [])}
        items, skipped = [], []
        for ann in data.get("annotations", []):
            name = files.get(ann.get("image_id"))
            if name is None:
                skipped.append(Skipped(f"annotation {ann.get('id')}", f"unknown image_id {ann.get('image_id')}"))
                continue
            items.append((str(image_dir / name), str(ann.get("caption", "")).strip()))
        super().__init__(items, resolution, skipped)


# ----------------------------------------------------------------------------- synthetic shapes

COLOURS = {  # far apart in RGB, so a colour is never ambiguous after anti-aliasing
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.30, "large": 0.50}  # shape extent as a fraction of the image side
POSITIONS = {  # centre (x, y) as fractions of the image side
    "at the top left": (0.28, 0.28),
    "at the top right": (0.72, 0.28),
    "at the bottom left": (0.28, 0.72),
    "at the bottom right": (0.72, 0.72),
    "in the center": (0.5, 0.5),
}
BACKGROUND = (40, 40, 40)
JITTER = 0.03  # random offset of the centre, fraction of the side (positions stay unambiguous)
SUPERSAMPLE = 4  # drawn at 4× and box-filtered down: anti-aliased edges


def caption(colour: str, shape: str, size: str, position: str) -> str:
    return f"a {size} {colour} {shape} {position}"


def all_captions() -> list[str]:
    return [caption(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def render_shape(colour: str, shape: str, size: str, position: str, resolution: int, offset=(0.0, 0.0)):
    """The PIL image of one shape on the plain background."""
    Image = _pil()
    from PIL import ImageDraw

    S = resolution * SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx, cy = (cx + offset[0]) * S, (cy + offset[1]) * S
    r = SIZES[size] * S / 2
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.9  # a square of side 2r looks bigger than a circle of diameter 2r
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    else:  # upright isosceles triangle filling the same box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


class ShapesDataset(Dataset):
    """Synthetic captioned shapes: colour × shape × size × position, ``length`` images.

    Attributes are drawn uniformly from ``COLOURS``, ``SHAPES``, ``SIZES`` and
    ``POSITIONS``; the centre is jittered by up to ``JITTER``.  Items also carry the
    attributes (``colour``, ``shape``, ``size``, ``position``) for evaluation.
    """

    def __init__(self, resolution: int = 32, length: int = 100_000, seed: int = 0):
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.resolution = resolution
        self.length = length
        self.seed = seed
        self.skipped: list[Skipped] = []

    def __len__(self) -> int:
        return self.length

    def attributes(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        return {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)),
            "offset": (rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)),
        }

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        a = self.attributes(i)
        img = render_shape(a["colour"], a["shape"], a["size"], a["position"], self.resolution, a["offset"])
        text = caption(a["colour"], a["shape"], a["size"], a["position"])
        return {"image": to_tensor(img), "text": text, **{k: a[k] for k in ("colour", "shape", "size", "position")}}


# ----------------------------------------------------------------------------- batching


def collate(examples: list[dict]) -> dict:
    """Stack good examples; unreadable ones are dropped and listed in ``batch["skipped"]``."""
    good = [e for e in examples if "skipped" not in e]
    batch = {
        "image": torch.stack([e["image"] for e in good]) if good else torch.empty(0),
        "text": [e["text"] for e in good],
        "skipped": [e["skipped"] for e in examples if "skipped" in e],
    }
    return batch


def report(skipped: list[Skipped], limit: int = 5) -> str:
    """A short human summary of skipped examples."""
    if not skipped:
        return "no examples skipped"
    lines = [f"{len(skipped)} example(s) skipped:"]
    lines += [f"  {s.source}: {s.reason}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def open_dataset(spec: str, resolution: int, seed: int = 0) -> Dataset:
    """A dataset from a command-line spec: "shapes", a folder of class sub-folders, a ``.jsonl``
    file, or ``coco:<captions_*.json>:<image dir>``."""
    if spec == "shapes":
        return ShapesDataset(resolution=resolution, seed=seed)
    if spec.startswith("coco:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"a COCO dataset is given as coco:<captions json>:<image dir>, got {spec!r}")
        return CocoCaptions(parts[1], parts[2], resolution)
    if spec.endswith(".jsonl"):
        return JsonlCaptions(spec, resolution)
    if os.path.isdir(spec):
        return ImageFolder(spec, resolution)
    raise FileNotFoundError(f"data must be 'shapes', an image folder, a .jsonl file or coco:<json>:<dir>; got {spec!r}")


# ----------------------------------------------------------------------------- shapes analyser


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, as arrays of (y, x) indices."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pix))
    return comps


# Thresholds on two features of the region, from the shapes as drawn by `render_shape`:
# fill = area / bounding-box area (square 1, disc π/4 ≈ 0.79, triangle 1/2) and
# top/bottom = area in the top half of the box / area in the bottom half (upright
# triangle 1/3, disc and square 1).  Pixelation blurs fill at small sizes (a small
# triangle fills up to ~0.65 of its box), never the top/bottom ratio.
_TRIANGLE_MAX_TOP_BOTTOM = 0.6
_SQUARE_MIN_FILL = 0.9


def analyse_shape_image(image) -> dict | None:
    """Read colour, shape, size and position back from a shapes image (the inverse of `render_shape`).

    image: (3, H, W) tensor in [−1, 1] or a PIL image.  Deterministic: the shape is
    the largest connected region that differs from the background; its colour is
    the nearest palette colour to the mean of its interior pixels; its kind comes
    from its fill ratio and top/bottom balance (see the thresholds above).
    Returns None when no shape is found.
    """
    if torch.is_tensor(image):
        arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    else:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W, _ = arr.shape
    bg = np.array(BACKGROUND, dtype=np.float32)
    dist = np.linalg.norm(arr - bg, axis=-1)
    # Half the smallest palette-to-background distance: every colour's interior is far above it.
    threshold = 0.5 * min(np.linalg.norm(np.array(c, np.float32) - bg) for c in COLOURS.values())
    comps = _components(dist > threshold)
    if not comps:
        return None
    pix = max(comps, key=len)
    ys, xs = pix[:, 0], pix[:, 1]
    # Colour from the pixels not touching the edge of the region (anti-aliased edges mix in the background).
    region = np.zeros((H, W), bool)
    region[ys, xs] = True
    interior = region.copy()
    interior[1:] &= region[:-1]
    interior[:-1] &= region[1:]
    interior[:, 1:] &= region[:, :-1]
    interior[:, :-1] &= region[:, 1:]
    core = arr[interior] if interior.any() else arr[region]
    mean = core.mean(0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c], np.float32)))
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = len(pix) / (h * w)
    mid = ys.min() + h / 2 - 0.5  # rows strictly above / below the box's middle line
    top_bottom = (ys < mid).sum() / max((ys > mid).sum(), 1)
    if top_bottom < _TRIANGLE_MAX_TOP_BOTTOM:
        shape = "triangle"
    else:
        shape = "square" if fill >= _SQUARE_MIN_FILL else "circle"
    extent = max(h, w) / H
    size = min(SIZES, key=lambda s: abs(SIZES[s] * (0.9 if shape == "square" else 1.0) - extent))
    cx, cy = (xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H
    if shape == "triangle":  # the centroid of an upright triangle sits 1/6 of its height below the box centre
        cy -= h / H / 6
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"colour": colour, "shape": shape, "size": size, "position": position, "fill": float(fill),
            "top_bottom": float(top_bottom)}  # fmt: skip


def parse_caption(text: str) -> dict:
    """The attributes of a shapes caption (inverse of `caption`)."""
    for c in COLOURS:
        for s in SHAPES:
            for z in SIZES:
                for p in POSITIONS:
                    if caption(c, s, z, p) == text:
                        return {"colour": c, "shape": s, "size": z, "position": p}
    raise ValueError(f"not a shapes caption: {text!r}")
