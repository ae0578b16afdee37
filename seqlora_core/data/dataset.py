"""A concept's training images and captions, read from a folder.

Folder layout: images (png, jpg, jpeg, webp, bmp) with optional same-name `.txt` captions, directly
in the folder and/or in kohya-style `N_name` subfolders whose images count N times (repeats). The
`name` part of a kohya folder is ignored: the trigger is given explicitly. A folder that is itself
named `N_name` gives its direct images N repeats (at least one: the chosen folder is never emptied);
`0_name` subfolders are skipped, as kohya does. Other subfolders and hidden files are ignored.

Resize rule (`resolution` must be a multiple of 8; SD1.x/SDXL need a multiple of 64):
- `"center_crop"` (default): scale so the shortest side equals `resolution` (Lanczos), then crop
  the centre to `resolution` x `resolution`.
- `"bucket"`: keep the aspect ratio (clamped to 1:4..4:1). The bucket is w = floor(R * sqrt(a)),
  h = floor(R / sqrt(a)), each rounded down to a multiple of 64 (of 8 when R < 256), so
  w * h <= R^2; the image is scaled to cover the bucket and centre-cropped to it.

Pixels are stored as uint8 and returned as float tensors (3, H, W) in [-1, 1].

Limits: at most ``MAX_IMAGES`` image files (a clear error beyond); images over Pillow's decompression-bomb
limit are skipped with that reason. With ``confine=True`` (hosts that serve remote users) every file and
subfolder must lie inside the folder once links are resolved; what lies outside is skipped and named.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .captions import DEFAULT_TEMPLATE, check_template, make_caption, make_prior_caption, read_caption

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES = 10_000  # image files in one concept folder
MAX_ENTRIES = 50_000  # directory entries looked at in one concept folder (and each of its kohya folders)
MAX_RESOLUTION = 2048  # training side in pixels: SDXL trains at 1024; beyond 2048 memory, not quality, grows
RESIZE_MODES = ("center_crop", "bucket")
_KOHYA = re.compile(r"^(\d+)_(.+)$")


def accepted_types() -> str:
    """Human-readable list of accepted image extensions."""
    return ", ".join(IMAGE_EXTS)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-orient and convert any PIL mode to RGB; transparency is composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (w, h) bucket of an image for `resize="bucket"` (see the module docstring)."""
    step = 64 if resolution >= 256 else 8
    a = min(max(width / height, 0.25), 4.0)
    bw = max(step, int(resolution * math.sqrt(a)) // step * step)
    bh = max(step, int(resolution / math.sqrt(a)) // step * step)
    return bw, bh


def resize_image(img: Image.Image, resolution: int, resize: str) -> tuple[Image.Image, tuple[int, int]]:
    """Apply the resize rule; returns the image and the crop's (top, left) in resized pixels."""
    w, h = img.size
    tw, th = (resolution, resolution) if resize == "center_crop" else bucket_size(w, h, resolution)
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th)), (top, left)


@dataclass
class ConceptDataset:
    """One concept's images (uint8, 3 x H x W) with captions, trigger-free prior captions and repeats."""

    trigger: str
    resolution: int
    resize: str
    paths: list[Path] = field(default_factory=list)
    pixels_u8: list[torch.Tensor] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    given_captions: list[str | None] = field(default_factory=list)  # each image's .txt as read, or None
    prior_captions: list[str] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (h, w) before resizing
    crops_top_left: list[tuple[int, int]] = field(default_factory=list)  # (top, left)
    skipped: list[Path] = field(default_factory=list)
    skip_reasons: dict[Path, str] = field(default_factory=dict)  # why each skipped image was skipped

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        trigger: str,
        caption_template: str = DEFAULT_TEMPLATE,
        resolution: int = 512,
        resize: str = "center_crop",
        class_word: str | None = None,
        confine: bool = False,
    ) -> ConceptDataset:
        """Read a concept folder (layout, caption and resize rules: see the module docstring).

        Captions: the `.txt` next to an image, else `caption_template`; the trigger is prepended
        when missing (`make_caption`). Prior captions drop the trigger (`make_prior_caption`).
        Unreadable images are skipped with one warning listing them and why. ``confine``: skip files and
        folders that links lead out of the folder.
        Raises FileNotFoundError for a missing folder, ValueError for a folder without usable images.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"concept folder not found: {root}")
        if not trigger.strip():
            raise ValueError("trigger must be a non-empty string")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if resolution <= 0 or resolution % 8 or resolution > MAX_RESOLUTION:
            raise ValueError(f"resolution must be a positive multiple of 8 up to {MAX_RESOLUTION}, got {resolution}")
        check_template(caption_template)
        ds = cls(trigger=trigger.strip(), resolution=resolution, resize=resize)
        reasons: dict[Path, str] = {}
        inside = _Confinement(root) if confine else None
        for file, reps in _list_images(root, inside, reasons):
            try:
                with Image.open(file) as im:
                    im.load()
                    rgb = to_rgb(im)
            except Image.DecompressionBombError as e:
                reasons[file] = f"too large ({str(e).replace(str(file), file.name)}); downscale it"
                continue
            except (OSError, ValueError, SyntaxError) as e:
                reasons[file] = f"unreadable ({type(e).__name__}: {str(e).replace(str(file), file.name)[:80]})"
                continue
            out, crop = resize_image(rgb, resolution, resize)
            caption_file = file.with_suffix(".txt")
            if inside is not None and caption_file.exists() and not inside.holds(caption_file):
                reasons[caption_file] = "a link that leads outside the folder (not read)"
                raw = None
            else:
                raw = read_caption(caption_file)
            caption = make_caption(raw, ds.trigger, caption_template)
            ds.paths.append(file)
            ds.pixels_u8.append(torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous())
            ds.given_captions.append(raw)
            ds.captions.append(caption)
            ds.prior_captions.append(make_prior_caption(caption, ds.trigger, class_word))
            ds.repeats.append(reps)
            ds.original_sizes.append((rgb.height, rgb.width))
            ds.crops_top_left.append(crop)
        ds.skip_reasons = {p: why for p, why in reasons.items() if p.suffix.lower() in IMAGE_EXTS}
        ds.skipped = list(ds.skip_reasons)
        if reasons:
            shown = "; ".join(f"{_relative(p, root)}: {why}" for p, why in list(reasons.items())[:20])
            more = f"; and {len(reasons) - 20} more" if len(reasons) > 20 else ""
            warnings.warn(
                f"skipped {len(reasons)} unreadable or unusable file(s) in {root}: {shown}{more}", stacklevel=2
            )
        if not ds.paths:
            why = (
                f"all {len(ds.skipped)} image file(s) are unreadable or unusable" if ds.skipped else "it has no images"
            )
            raise ValueError(
                f"no usable training images in {root}: {why}. Accepted: {accepted_types()} "
                "(optional same-name .txt captions; kohya 'N_name' subfolders repeat N times)."
            )
        return ds

    def __len__(self) -> int:
        return len(self.pixels_u8)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels(i), "caption": self.captions[i], "prior_caption": self.prior_captions[i]}

    def pixels(self, i: int) -> torch.Tensor:
        """Image i as float32 (3, H, W) in [-1, 1]."""
        return self.pixels_u8[i].float() / 127.5 - 1.0

    def size(self, i: int) -> tuple[int, int]:
        """(h, w) of image i after resizing."""
        return tuple(self.pixels_u8[i].shape[1:])  # type: ignore[return-value]

    def weighted_indices(self) -> list[int]:
        """Every image index repeated `repeats` times (one epoch)."""
        return [i for i, r in enumerate(self.repeats) for _ in range(r)]


class _Confinement:
    """Whether a path, links resolved, lies inside the folder (links resolved too)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def holds(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a link loop
            return False


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _list_images(
    root: Path, inside: _Confinement | None = None, reasons: dict[Path, str] | None = None
) -> list[tuple[Path, int]]:
    """(image file, repeats) in sorted order: the folder's own images, then kohya `N_name` subfolders.

    ``inside``: leave out what links lead out of the folder (listed in ``reasons``). ValueError beyond
    ``MAX_IMAGES`` images or ``MAX_ENTRIES`` entries in one folder."""
    reasons = {} if reasons is None else reasons

    def allowed(p: Path) -> bool:
        if inside is None or inside.holds(p):
            return True
        reasons[p] = "a link that leads outside the folder (not read)"
        return False

    own = _KOHYA.match(root.name)
    own_repeats = max(int(own.group(1)), 1) if own else 1
    found = [(f, own_repeats) for f in _image_files(root) if allowed(f)]
    for sub in sorted(p for p in _entries(root) if p.is_dir() and not p.name.startswith(".")):
        m = _KOHYA.match(sub.name)
        if m and int(m.group(1)) > 0 and allowed(sub):
            found += [(f, int(m.group(1))) for f in _image_files(sub) if allowed(f)]
        if len(found) > MAX_IMAGES:
            break
    if len(found) > MAX_IMAGES:
        raise ValueError(
            f"{root} holds more than {MAX_IMAGES} images; a concept needs far fewer (3-100 is typical). "
            "Choose a smaller folder"
        )
    return found


def _entries(folder: Path) -> list[Path]:
    """The entries of one folder; ValueError beyond ``MAX_ENTRIES`` (a folder of a whole disk, not a concept)."""
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            out.append(Path(entry.path))
            if len(out) > MAX_ENTRIES:
                raise ValueError(
                    f"{folder} holds more than {MAX_ENTRIES} entries; give the folder of one concept's images"
                )
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in _entries(folder) if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()
    )


def folder_signature(path: str | Path, confine: bool = False) -> str:
    """A digest of what :meth:`ConceptDataset.from_folder` would read (names, sizes and times of the images and
    their captions): cheap, bounded by the folder limits, for hosts that ask 'has this folder changed?'.
    ``confine``: as in ``from_folder``, nothing that links lead out of the folder is looked at."""
    root = Path(path)
    inside = _Confinement(root) if confine else None
    h = hashlib.sha256()
    for file, reps in _list_images(root, inside):
        for p in (file, file.with_suffix(".txt")):
            if inside is not None and p.exists() and not inside.holds(p):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{_relative(p, root)}:{reps}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
