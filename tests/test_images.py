"""Decoding: every mode to RGB, every failure to a one-line reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers import pattern, save_pattern, write_bad_corpus
from pipeline import images
from pipeline.errors import ImageError, PipelineError
from pipeline.images import TrimFrame, find_images, load_image, nearest_shape, to_rgb, trim_frame


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good, bad = write_bad_corpus(root)
    return root, good, bad


def test_find_images_recursive_case_insensitive(gallery, tmp_path):
    found = find_images([gallery])
    assert len(found) == 12
    assert all(p.is_absolute() for p in found) and found == sorted(found)
    assert {p.suffix for p in found} == {".jpg", ".PNG", ".jpeg", ".webp"}
    assert find_images([found[0]]) == [found[0]]  # a single file is a root too
    with pytest.raises(PipelineError, match="folder not found"):
        find_images([tmp_path / "missing"])


def test_every_good_file_decodes_to_rgb(corpus):
    root, good, _ = corpus
    for name in good:
        d = load_image(root / name, 32)
        assert d.pixels.shape == (32, 32, 3) and d.pixels.dtype == np.uint8, name
        assert len(d.content_hash) == 32 and d.size == os.path.getsize(root / name)


def test_every_bad_file_has_a_one_line_reason(corpus):
    root, _, bad = corpus
    for name, word in bad.items():
        with pytest.raises(ImageError) as err:
            load_image(root / name, 32)
        assert word in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_alpha_is_composited_on_white(corpus):
    root, _, _ = corpus
    assert (load_image(root / "alpha.png", 16).pixels == 255).all()


def test_sixteen_bit_keeps_its_range(corpus):
    px = load_image(corpus[0] / "gray16.png", 32).pixels
    assert px.min() < 10 and px.max() > 245


def test_exif_orientation_is_applied(corpus):
    px = load_image(corpus[0] / "exif_rotated.jpg", 32).pixels.astype(int)
    top, bottom = px[:12].mean(axis=(0, 1)), px[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the red half is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60


def test_large_jpeg_uses_draft_mode(tmp_path, monkeypatch):
    path = save_pattern(tmp_path / "big.jpg", 5, size=(2000, 1500), quality=90)
    decoded_sizes = []

    def spy(im: Image.Image) -> Image.Image:  # sees the decoded image before the resize
        decoded_sizes.append(im.size)
        return to_rgb(im)

    monkeypatch.setattr(images, "to_rgb", spy)
    assert load_image(path, 64).pixels.shape == (64, 64, 3)
    assert decoded_sizes == [(250, 188)]  # decoded at 1/8 scale: the largest that keeps both sides >= 64


def test_aspect_kept_resize_picks_the_nearest_shape(tmp_path):
    shapes = ((256, 256), (224, 304), (304, 224), (192, 352))
    assert nearest_shape(shapes, 400, 300) == (224, 304) and nearest_shape(shapes, 300, 400) == (304, 224)
    assert nearest_shape(shapes, 1920, 1080) == (192, 352) and nearest_shape(shapes, 500, 480) == (256, 256)
    assert nearest_shape(224, 1920, 1080) == (224, 224)  # a square model squashes
    path = save_pattern(tmp_path / "wide.jpg", 1, (400, 225))
    assert load_image(path, shapes).pixels.shape == (192, 352, 3)


def test_trim_frame_removes_a_frame_and_nothing_else():
    pic = Image.fromarray(pattern(3, (120, 90)))
    assert trim_frame(pic) is pic  # no frame: the picture itself
    frames = [((12, 9), (240, 240, 240)), ((0, 15), (0, 0, 0)), ((20, 0), (30, 30, 30)), ((6, 40), (255, 255, 255))]
    for border, fill in frames:
        assert trim_frame(ImageOps.expand(pic, border=border, fill=fill)).size == pic.size  # mat, letterbox, pillarbox

    def painted(top: int, bottom: int, top_fill=(200, 220, 255), bottom_fill=(200, 220, 255)) -> Image.Image:
        a = pattern(3, (120, 90)).copy()
        a[:top], a[len(a) - bottom :] = top_fill, bottom_fill
        return Image.fromarray(a)

    for im in [
        painted(30, 0),  # a clear sky along the top: part of the picture, not a frame
        painted(0, 20, bottom_fill=(255, 255, 255)),  # a caption band
        painted(4, 30),  # two bands of unlike widths
        painted(12, 12, top_fill=(0, 0, 0), bottom_fill=(255, 255, 255)),  # of unlike colours
        painted(30, 30),
    ]:  # what is left would be under half the picture
        assert trim_frame(im) is im


def test_framed_jpeg_decodes_like_its_original(tmp_path):
    pic = Image.fromarray(pattern(5, (160, 120)))
    pic.save(tmp_path / "original.png")
    ImageOps.expand(pic, border=(16, 12), fill=(240, 240, 240)).save(tmp_path / "framed.jpg", quality=75)
    original = load_image(tmp_path / "original.png", 64).pixels.astype(float)
    framed = load_image(tmp_path / "framed.jpg", TrimFrame(64)).pixels.astype(float)
    untrimmed = load_image(tmp_path / "framed.jpg", 64).pixels.astype(float)
    assert np.abs(framed - original).mean() < 4 < np.abs(untrimmed - original).mean()  # JPEG noise, not the frame


def test_lower_pixel_limit(tmp_path):
    path = save_pattern(tmp_path / "p.png", 1)
    with pytest.raises(ImageError, match="too large"):
        load_image(path, 32, max_pixels=100)


def test_fifo_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg", 32, timeout=2)
