"""ConceptDataset: folder layouts, image modes, captions, repeats, resizing and errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _images import concept_folder, noise_image, save
from PIL import Image

from seqlora_core.data.captions import make_caption, make_prior_caption
from seqlora_core.data.dataset import ConceptDataset, bucket_size


def test_mixed_sizes_and_modes_become_rgb_in_range(tmp_path):
    d = tmp_path / "concept"
    save(noise_image(80, 64, 0), d / "a_rgb.png")
    save(noise_image(64, 100, 1, "L"), d / "b_gray.jpg")
    rgba = Image.new("RGBA", (72, 72), (255, 0, 0, 0))  # fully transparent red -> white
    save(rgba, d / "c_rgba.png")
    save(Image.new("CMYK", (64, 64), (0, 0, 0, 0)), d / "d_cmyk.jpg")  # no ink -> white
    save(noise_image(90, 70, 2).convert("P", palette=Image.Palette.ADAPTIVE), d / "e_pal.png")
    save(noise_image(64, 64, 3), d / "f.webp")
    save(noise_image(64, 80, 4), d / "g.BMP")
    save(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), d / "h_16bit.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] * 256)
    save(pal, d / "i_pal_transparent.png", transparency=0)  # transparent palette index -> white
    (d / "notes.md").write_text("not an image")

    ds = ConceptDataset.from_folder(d, "sks", resolution=64)

    assert [p.name for p in ds.paths] == [
        "a_rgb.png",
        "b_gray.jpg",
        "c_rgba.png",
        "d_cmyk.jpg",
        "e_pal.png",
        "f.webp",
        "g.BMP",
        "h_16bit.png",
        "i_pal_transparent.png",
    ]
    assert ds.skipped == []
    for i in range(len(ds)):
        px = ds.pixels(i)
        assert px.shape == (3, 64, 64) and px.dtype == torch.float32
        assert px.min() >= -1.0 and px.max() <= 1.0
    gray = ds.pixels(1)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    for white in (2, 3, 7, 8):  # transparent RGBA/palette on white, blank CMYK, max 16-bit grey
        assert torch.allclose(ds.pixels(white), torch.ones(3, 64, 64), atol=0.02)
    assert ds.original_sizes[0] == (64, 80) and ds.original_sizes[1] == (100, 64)
    assert ds[0]["pixels"].shape == (3, 64, 64) and ds[0]["caption"] == "a photo of sks"


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    save(noise_image(48, 24), tmp_path / "rot.jpg", exif=exif)
    ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=16)
    assert ds.original_sizes == [(48, 24)]  # (h, w) after transposition


def test_center_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((60, 120, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:80] = (0, 255, 0)
    arr[:, 80:] = (0, 0, 255)
    save(Image.fromarray(arr), tmp_path / "stripes.png")
    ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=32)
    px = ds.pixels(0)
    assert px.shape == (3, 32, 32)
    assert ds.crops_top_left == [(0, 16)]  # 120x60 -> 64x32, centre 32 columns from x = 16
    green = px[:, :, 8:24].mean(dim=(1, 2))  # green spans crop columns 5-27
    assert green[1] > 0.9 and green[0] < -0.9 and green[2] < -0.9


def test_bucket_mode_keeps_aspect_and_rounds(tmp_path):
    concept_folder(tmp_path, [(128, 64), (64, 64), (50, 200)])
    ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=64, resize="bucket")
    assert [ds.size(i) for i in range(3)] == [(40, 88), (64, 64), (128, 32)]
    for i in range(3):
        h, w = ds.size(i)
        assert h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64
    assert bucket_size(1024, 768, 512) == (576, 384)  # multiples of 64 at SD resolutions


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    concept_folder(tmp_path, [(64, 64), (64, 64)])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=32)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "broken.png" in msg and "truncated.jpg" in msg and "skipped 2 unreadable" in msg
    assert len(ds) == 2 and [p.name for p in ds.skipped] == ["broken.png", "truncated.jpg"]


def test_fully_unusable_folder_raises(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError) as err:
        ConceptDataset.from_folder(tmp_path, "sks", resolution=32)
    assert str(tmp_path) in str(err.value) and "unreadable" in str(err.value) and ".png" in str(err.value)


@pytest.mark.parametrize("content", [{}, {"anim.gif": b"GIF89a", "caption.txt": b"sks"}])
def test_empty_folder_raises_naming_folder_and_types(tmp_path, content):
    for name, data in content.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError) as err:
        ConceptDataset.from_folder(tmp_path, "sks")
    msg = str(err.value)
    assert str(tmp_path) in msg and all(ext in msg for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))


def test_missing_folder_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ConceptDataset.from_folder(missing, "sks")


def test_bad_arguments_raise(tmp_path):
    concept_folder(tmp_path, [(64, 64)])
    with pytest.raises(ValueError, match="multiple of 8"):
        ConceptDataset.from_folder(tmp_path, "sks", resolution=60)
    with pytest.raises(ValueError, match="resize"):
        ConceptDataset.from_folder(tmp_path, "sks", resize="stretch")
    with pytest.raises(ValueError, match="trigger"):
        ConceptDataset.from_folder(tmp_path, "  ")


def test_caption_rules(tmp_path):
    caps = ["SKS dog on the grass", "a dog, sitting", "", None, "a sksx toy", "  multi\nline   caption "]
    concept_folder(tmp_path, [(32, 32)] * len(caps), caps)
    ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=32, caption_template="a photo of {trigger} dog")
    assert ds.captions == [
        "SKS dog on the grass",  # contains the trigger (case-insensitive): unchanged
        "sks, a dog, sitting",  # trigger prepended
        "a photo of sks dog",  # empty .txt -> template
        "a photo of sks dog",  # no .txt -> template
        "sks, a sksx toy",  # 'sksx' is not the trigger word
        "sks, multi line caption",  # whitespace collapsed
    ]
    assert ds.prior_captions == [
        "dog on the grass",
        "a dog, sitting",
        "a photo of dog",
        "a photo of dog",
        "a sksx toy",
        "multi line caption",
    ]


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"], ids=str
)
def test_caption_files_in_every_unicode_form_read_the_same(tmp_path, encoding):
    """A .txt saved by a Windows editor ('UTF-8 with BOM', 'Unicode') reads as its text, without a mark.

    The ComfyUI Image Folder node used to read captions on its own, as UTF-8 keeping the mark: a caption
    with a byte-order mark trained as '\ufeff...' there, and UTF-16 captions were garbage everywhere."""
    from seqlora_core.data.captions import caption_line, read_caption

    text = "sks dog, grüne Wiese\r\nzweite Zeile"
    marks = {"utf-16-le-bom": ("\ufeff", "utf-16-le"), "utf-16-be-bom": ("\ufeff", "utf-16-be")}
    mark, codec = marks.get(encoding, ("", encoding))
    save(noise_image(32, 32), tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes((mark + text).encode(codec))
    assert read_caption(tmp_path / "a.txt") == text
    ds = ConceptDataset.from_folder(tmp_path, "sks", resolution=32)
    assert ds.given_captions == [text]
    assert ds.captions == ["sks dog, grüne Wiese zweite Zeile"]
    assert caption_line(ds.given_captions[0]) == "sks dog, grüne Wiese zweite Zeile"  # the Image Folder node's line
    assert read_caption(tmp_path / "missing.txt") is None


def test_prior_caption_helpers():
    assert make_prior_caption("sks, a photo of sks", "sks") == "a photo of"
    assert make_prior_caption("a photo of ohwx man", "ohwx man", class_word="man") == "a photo of man"
    assert make_prior_caption("Sks", "sks") == ""
    assert make_caption("a portrait, of ohwx  man", "ohwx man", "x") == "a portrait, of ohwx man"
    assert make_caption(None, "ohwx man", "photo of {trigger}") == "photo of ohwx man"


def test_kohya_repeat_folders(tmp_path):
    root = tmp_path / "train"
    save(noise_image(32, 32, 0), root / "own.png")
    save(noise_image(32, 32, 1), root / "10_dog" / "a.png", "sks dog")
    save(noise_image(32, 32, 2), root / "10_dog" / "b.jpg")
    save(noise_image(32, 32, 3), root / "3_sks toy" / "c.png")
    save(noise_image(32, 32, 4), root / "misc" / "ignored.png")
    ds = ConceptDataset.from_folder(root, "sks", resolution=32)
    assert [p.name for p in ds.paths] == ["own.png", "a.png", "b.jpg", "c.png"]
    assert ds.repeats == [1, 10, 10, 3]
    assert len(ds.weighted_indices()) == 24 and ds.weighted_indices().count(1) == 10
    direct = ConceptDataset.from_folder(root / "10_dog", "sks", resolution=32)
    assert direct.repeats == [10, 10] and direct.captions == ["sks dog", "a photo of sks"]


def test_zero_repeat_prefix(tmp_path):
    """kohya skips a `0_name` subfolder; the folder the user chose keeps its images whatever its name."""
    save(noise_image(32, 32, 0), tmp_path / "0_7" / "own.png")
    save(noise_image(32, 32, 1), tmp_path / "0_7" / "0_off" / "skipped.png")
    ds = ConceptDataset.from_folder(tmp_path / "0_7", "sks", resolution=32)
    assert [p.name for p in ds.paths] == ["own.png"] and ds.weighted_indices() == [0]


def test_utf16_captions_without_a_byte_order_mark_are_read(tmp_path):
    concept_folder(tmp_path, [(32, 32), (32, 32)])
    (tmp_path / "img0.txt").write_bytes("zq dog on grass".encode("utf-16-le"))
    (tmp_path / "img1.txt").write_bytes("zq dog in snow".encode("utf-16-be"))
    ds = ConceptDataset.from_folder(tmp_path, "zq dog", resolution=32)
    assert ds.given_captions == ["zq dog on grass", "zq dog in snow"]


def test_an_image_over_the_size_limit_is_called_too_large(tmp_path, monkeypatch):
    concept_folder(tmp_path, [(32, 32), (64, 64)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64 x 64 is over twice this: a decompression bomb
    with pytest.warns(UserWarning) as caught:
        ds = ConceptDataset.from_folder(tmp_path, "zq", resolution=32)
    msg = " ".join(str(w.message) for w in caught)
    assert "img1.png: too large" in msg and "downscale it" in msg and len(ds) == 1


def test_each_skipped_image_keeps_its_reason_without_the_folder_path(tmp_path, monkeypatch):
    """Hosts (the Image Folder node) show why each file was skipped: a big image is 'too large', not
    'unreadable', and no reason holds the folder's absolute path."""
    concept_folder(tmp_path, [(32, 32), (64, 64)])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.warns(UserWarning):
        ds = ConceptDataset.from_folder(tmp_path, "zq", resolution=32)
    reasons = {p.name: why for p, why in ds.skip_reasons.items()}
    assert sorted(reasons) == ["broken.png", "img1.png"] and list(ds.skip_reasons) == ds.skipped
    assert reasons["img1.png"].startswith("too large") and reasons["img1.png"].endswith("downscale it")
    assert reasons["broken.png"].startswith("unreadable")
    assert not any(str(tmp_path) in why for why in reasons.values()), reasons


def test_a_caption_template_with_other_placeholders_is_refused(tmp_path):
    concept_folder(tmp_path, [(32, 32)])
    with pytest.raises(ValueError, match="caption_template: 'a {thing}' names {thing}"):
        ConceptDataset.from_folder(tmp_path, "zq", caption_template="a {thing}", resolution=32)
