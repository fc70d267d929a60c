"""The geometric check of copies on small generated pictures: a crop, a rotation and a mirror verify; a
different picture of the same colours and style does not; an unreadable file is unverified with its reason."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from helpers import textured_picture as picture
from pipeline.copies import (
    CACHE_VERSION,
    INLIER_THRESHOLD,
    LocalFeatures,
    features_from_bytes,
    features_to_bytes,
    local_features,
    matches,
    verify_candidates,
    verify_pair,
)
from pipeline.copies.check import MIN_CENTRE, MIN_COVERAGE, MIN_SPREAD, hamming_knn, inliers

pytest.importorskip("cv2", reason="the verify extra (opencv-python-headless) is not installed")


@pytest.fixture(scope="module")
def original():
    return local_features(np.asarray(picture(1)))


def as_query(im: Image.Image):
    return local_features(np.asarray(im), mirrored=True)


def test_a_half_crop_verifies(original):
    im = picture(1)
    w, h = im.size
    verdict = verify_pair(as_query(im.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))), original)
    assert verdict.verified and verdict.inliers >= INLIER_THRESHOLD and verdict.reason is None


def test_a_rotation_by_ten_degrees_verifies(original):
    verdict = verify_pair(as_query(picture(1).rotate(10, resample=Image.Resampling.BILINEAR, expand=True)), original)
    assert verdict.verified


def test_a_mirror_verifies_through_the_mirrored_query(original):
    mirrored = picture(1).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert verify_pair(as_query(mirrored), original).verified
    plain = inliers(local_features(np.asarray(mirrored)), original)
    mirror = as_query(mirrored).mirror
    assert mirror is not None and inliers(mirror, original) > 5 * max(plain, INLIER_THRESHOLD)
    assert inliers(local_features(np.asarray(picture(2))), original, needed=10**6) == 0  # no fit tried


def test_a_different_picture_of_the_same_style_does_not_verify(original):
    verdicts = verify_candidates(original, [local_features(np.asarray(picture(seed))) for seed in (2, 3, 4)])
    assert [v.verified for v in verdicts] == [False, False, False]
    assert all(v.inliers < INLIER_THRESHOLD for v in verdicts)


def test_a_dark_variant_does_not_verify_but_grey_and_brightened_copies_do(original):
    from PIL import ImageEnhance, ImageOps

    im = picture(1)
    darkened = as_query(ImageEnhance.Brightness(im).enhance(0.2))  # the "dark" variant of one wallpaper
    verdict = verify_pair(darkened, original)
    assert not verdict.verified and verdict.inliers >= INLIER_THRESHOLD and verdict.fit.lightness_shift > 60
    grey = ImageOps.grayscale(im).convert("RGB")
    brightened = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.8)
    for copy in (grey, brightened):
        assert verify_pair(as_query(copy), original).verified


def test_two_pictures_under_one_text_banner_do_not_verify_but_a_banner_copy_does(original):
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)

    def banner(im: Image.Image) -> Image.Image:  # a white band over the bottom quarter, two lines of text
        im = im.copy()
        w, h = im.size
        draw = ImageDraw.Draw(im)
        draw.rectangle((0, int(h * 0.75), w, h), fill=(255, 255, 255))
        for row in range(2):
            at = (6, int(h * 0.75) + 4 + row * int(h * 0.125))
            draw.text(at, "SAMPLE TEXT 2026 " * 3, fill=(220, 0, 0), font=font)
        return im

    query = as_query(banner(picture(1)))
    other = verify_pair(query, local_features(np.asarray(banner(picture(2)))))
    assert not other.verified and other.inliers >= INLIER_THRESHOLD and other.fit.spread >= MIN_SPREAD
    assert other.fit.coverage < MIN_COVERAGE  # (matched in the banner's cells alone)
    assert verify_pair(query, original).verified


def test_two_pictures_in_one_frame_do_not_verify_but_a_framed_copy_does(original):
    def framed(im: Image.Image) -> Image.Image:  # one textured frame around every picture, 12% of each side
        w, h = im.size
        out = picture(99, (w, h))
        out.paste(im.resize((round(w * 0.76), round(h * 0.76))), (round(w * 0.12), round(h * 0.12)))
        return out

    query = as_query(framed(picture(1)))
    other = verify_pair(query, local_features(np.asarray(framed(picture(2)))))
    assert not other.verified and other.inliers >= INLIER_THRESHOLD and other.fit.coverage >= MIN_COVERAGE
    assert other.fit.centre < MIN_CENTRE  # (matched in the frame's outer cells alone)
    assert verify_pair(query, original).verified


def test_hamming_neighbours_are_those_of_brute_force():
    rng = np.random.default_rng(3)
    base, queries = (rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (300, 200))
    bits = np.unpackbits(queries, axis=1)[:, None, :] != np.unpackbits(base, axis=1)[None, :, :]
    exact = bits.sum(2)  # [query, base] differing bits
    distances, indices = hamming_knn(base, queries, 2)
    assert (distances == np.sort(exact, axis=1)[:, :2]).all()
    assert (exact[np.arange(len(queries))[:, None], indices] == distances).all()


def test_matches_are_the_mutual_nearest_that_pass_the_ratio_test():
    rng = np.random.default_rng(4)

    def features(descriptors: np.ndarray) -> LocalFeatures:
        n = len(descriptors)
        return LocalFeatures(np.zeros((n, 2), np.float32), descriptors, (100, 100), np.zeros(n, np.uint8))

    def flipped(row: np.ndarray, bits: int) -> np.ndarray:  # `row` with `bits` of its bits flipped
        unpacked = np.unpackbits(row)
        unpacked[rng.choice(256, bits, replace=False)] ^= 1
        return np.packbits(unpacked)

    candidate = rng.integers(0, 256, (300, 32), dtype=np.uint8)  # random: ~128 bits from each other
    query = rng.integers(0, 256, (200, 32), dtype=np.uint8)
    planted = {3: 10, 50: 77, 120: 200}  # query row -> candidate row, 4 bits apart
    for q, c in planted.items():
        query[q] = flipped(candidate[c], 4)
    query[60] = flipped(candidate[77], 9)  # also nearest to candidate 77, passes the ratio test, not mutual
    mine, theirs = matches(features(query), features(candidate))
    assert dict(zip(mine.tolist(), theirs.tolist(), strict=True)) == planted


def test_an_unreadable_file_is_unverified_with_its_reason(tmp_path, original):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG")
    features = local_features(bad)
    assert features.reason and "not an image" in features.reason and len(features) == 0
    verdict = verify_pair(features, original)
    assert verdict == verify_pair(original, features)
    assert not verdict.verified and verdict.inliers == 0 and verdict.reason == features.reason
    assert "file not found" in (verify_pair(local_features(tmp_path / "gone.png"), original).reason or "")


def test_a_file_and_its_pixels_give_the_same_features(tmp_path, original):
    path = tmp_path / "a.png"
    picture(1).save(path)
    from_file = local_features(path)
    assert np.array_equal(from_file.descriptors, original.descriptors)
    assert from_file.size == original.size == (480, 360)


def test_the_cache_record_round_trips_compactly(original):
    data = features_to_bytes(original)
    assert data[0] == CACHE_VERSION and len(data) == 7 + 37 * len(original)
    back = features_from_bytes(data)
    assert np.array_equal(back.descriptors, original.descriptors) and back.size == original.size
    assert np.array_equal(back.lightness, original.lightness)
    assert np.abs(back.points - original.points).max() <= 0.25
    crop = as_query(picture(1).crop((100, 80, 340, 260)))
    assert verify_pair(crop, back).verified


def test_a_record_of_another_version_is_refused(original):
    from pipeline.errors import PipelineError

    data = bytearray(features_to_bytes(original))
    data[0] = CACHE_VERSION + 1
    with pytest.raises(PipelineError, match="version"):
        features_from_bytes(bytes(data))
    with pytest.raises(PipelineError, match="bytes"):
        features_from_bytes(features_to_bytes(original)[:-1])


def test_without_opencv_the_package_imports_and_says_how_to_install(monkeypatch, tmp_path):
    import pipeline.copies
    from pipeline.errors import PipelineError

    monkeypatch.setitem(sys.modules, "cv2", None)  # what `import cv2` meets where OpenCV is not installed
    assert pipeline.copies.WORK_SIDE  # imported, and usable up to the first OpenCV call
    with pytest.raises(PipelineError, match=r"pip install 'pipeline\[verify\]'"):
        local_features(tmp_path / "any.jpg")


@pytest.fixture()
def copies_index(tmp_path, tiny_model):
    """Four distinct pictures of one style, indexed; a half crop and a mirror of the first as queries."""
    from pipeline.rebuild import rebuild

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for seed in (1, 2, 3, 4):
        picture(seed).save(gallery / f"p{seed}.png")
    im = picture(1)
    w, h = im.size
    im.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).save(tmp_path / "crop.png")
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)
    return tmp_path, gallery


def test_search_verify_puts_verified_copies_first_and_names_unreadable_hits(copies_index):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.search import Searcher

    tmp, gallery = copies_index
    searcher = Searcher(tmp / "work" / "index")
    for query in ("crop.png", "mirror.png"):
        hits = searcher.search([tmp / query], k=4, verify=True)[0].hits
        assert hits[0].path == str(gallery / "p1.png") and hits[0].verified and hits[0].rank == 1, query
        assert [h.verified for h in hits[1:]] == [False, False, False], query
    (gallery / "p3.png").unlink()  # indexed, then gone: that hit cannot be checked, the others still are
    result = runner_json = CliRunner().invoke(
        app, ["search", str(tmp / "crop.png"), "--index", str(tmp / "work" / "index"), "-k", "4", "--verify", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    hits = json.loads(runner_json.stdout)[0]["results"]
    assert hits[0]["verified"] and hits[0]["inliers"] >= INLIER_THRESHOLD
    gone = next(h for h in hits if h["path"].endswith("p3.png"))
    assert gone["verified"] is False and "file not found" in gone["unverified"]
    plain = searcher.search([tmp / "crop.png"], k=4)[0].to_dict()["results"]
    assert all("verified" not in h for h in plain)  # only verified searches carry verdicts


def test_verify_over_http(copies_index, tiny_model, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline.serve import Service, create_app

    tmp, gallery = copies_index
    service = Service(tmp / "work" / "index", tiny_model, poll=0)
    with TestClient(create_app(service), base_url="http://127.0.0.1") as client:
        upload = [("image", ("mirror.png", (tmp / "mirror.png").read_bytes(), "image/png"))]
        hits = client.post("/api/search?k=4&verify=true", files=upload).json()[0]["results"]
        assert hits[0]["path"] == str(gallery / "p1.png") and hits[0]["verified"] is True
        assert [h["verified"] for h in hits[1:]] == [False, False, False]
        like = client.get("/api/search", params={"like": hits[0]["id"], "k": 4, "verify": "true"}).json()
        assert like[0]["results"][0]["verified"] is True  # the image itself
        from pipeline.errors import PipelineError
        from pipeline.serve import verified

        def missing():
            raise PipelineError("verifying copies needs OpenCV: pip install 'pipeline[verify]'")

        monkeypatch.setattr(verified, "opencv", missing)
        r = client.post("/api/search?verify=true", files=upload)
        assert r.status_code == 501 and "pipeline[verify]" in r.json()["error"]
