"""Make the bundled sample collection (samples/) from scikit-image's public-domain / CC0 photos.

Usage: python scripts/make_samples.py SKIMAGE_DATA_DIR [--out samples]
SKIMAGE_DATA_DIR is the skimage/data folder of a scikit-image wheel
(`pip download --no-deps scikit-image` and unzip it). Run once; the output is committed.

gallery/: each photo (long side 512, JPEG q90) plus two variants of it: half-size, and
heavily recompressed (JPEG q20). queries/: an 80% centre crop and a mirrored copy of some
photos, which are not in the gallery: the demo searches with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

# name -> (file in skimage/data, licence as stated in scikit-image's documentation)
PHOTOS = {
    "astronaut": ("astronaut.png", "NASA photo of Eileen Collins, public domain"),
    "brick": ("brick.png", "CC0 (CC0Textures Bricks25)"),
    "camera": ("camera.png", "CC0 by the photographer (Lav Varshney)"),
    "chelsea": ("chelsea.png", "CC0 by the photographer (Stefan van der Walt)"),
    "coffee": ("coffee.png", "CC0 by the photographer (Rachel Michetti)"),
    "coins": ("coins.png", "Brooklyn Museum collection, no known copyright restrictions"),
    "grass": ("grass.png", "CC0 (DeviantArt linolafett Grass-01)"),
    "gravel": ("gravel.png", "CC0 (CC0Textures Gravel04)"),
    "hubble": ("hubble_deep_field.jpg", "NASA Hubble eXtreme Deep Field, public domain"),
    "retina": ("retina.jpg", "CC0 (Mikael Häggström, Wikimedia Commons)"),
    "rocket": ("rocket.jpg", "SpaceX launch photo of DSCOVR, public domain"),
    "text": ("text.png", "Wikipedia Corner.png, public domain"),
}
QUERY_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "coins", "hubble"]


def fit(im: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(im.size)
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS) if scale < 1 else im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("skimage_data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("samples"))
    args = ap.parse_args()
    gallery, queries = args.out / "gallery", args.out / "queries"
    gallery.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sample images",
        "",
        "Made by `scripts/make_samples.py` from photos bundled with scikit-image",
        "(`skimage/data`), under the licences scikit-image states for them:",
        "",
    ]
    for name, (fname, licence) in PHOTOS.items():
        im = fit(Image.open(args.skimage_data / fname).convert("RGB"), 512)
        im.save(gallery / f"{name}.jpg", quality=90)
        fit(im, 256).save(gallery / f"{name}_half.jpg", quality=90)
        im.save(gallery / f"{name}_q20.jpg", quality=20)
        lines.append(f"- `{name}` ({fname}): {licence}")
        if name in QUERY_PHOTOS:
            w, h = im.size
            im.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(queries / f"{name}_crop80.jpg", quality=90)
            ImageOps.mirror(im).save(queries / f"{name}_mirror.jpg", quality=90)
    lines += [
        "",
        "gallery/: each photo, a half-size copy (`_half`) and a JPEG q20 recompression (`_q20`).",
        "queries/: 80% centre crops and mirrored copies of six photos (not in the gallery).",
    ]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
