"""Make a held-out transformed-copy set (like shared/eval/copies-dev, from other pictures).

Usage: python scripts/eval/make_heldout.py --out bench-output/heldout [--pictures 40]

Pictures: distinct ones from Debian's mate-backgrounds and plasma-workspace-wallpapers (fetched
by scripts/eval/fetch_photos.py's cache; copies-dev uses other packages), long side 640, JPEG q90, in
db/. Near-duplicates are left out as in copies-dev: the packages ship one wallpaper at several
sizes, crops and colours, so a picture whose 32x32 grey thumbnail (whole, or its centre 60%)
differs from an earlier picture's by less than 6/255 on average is skipped, and so is one of a wallpaper
already taken (wallpaper_of: its folder in plasma's wallpapers/NAME/, its name without colour words in
mate's): the thumbnails miss a portrait layout or a dark variant of one wallpaper, which verify point for
point (sets up to v7 hold some, rebuilt as they were with --keep-variants; docs/quality.md). Queries: 4
per picture, each two random transformations in sequence, named like copies-dev (`pic0007_crop70+jpeg15.jpg`); a
picture's four queries use four different pairs of transformations (so no two share a name, nor are the same
copy made in the other order). Writes groundtruth.json. Seeded; never committed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_photos import debian_pictures  # noqa: E402


def crop(im, frac, off=False, rng=None):
    w, h = im.size
    cw, ch = int(w * frac), int(h * frac)
    x = rng.randint(0, w - cw) if off else (w - cw) // 2
    y = rng.randint(0, h - ch) if off else (h - ch) // 2
    return im.crop((x, y, x + cw, y + ch))


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def text(im, rng):
    im = im.copy()
    d = ImageDraw.Draw(im)
    w, h = im.size
    d.rectangle((0, int(h * 0.75), w, h), fill=(255, 255, 255))
    d.text((10, int(h * 0.8)), "SAMPLE TEXT 2026 " * 3, fill=(220, 0, 0))
    return im


def border(im):
    w, h = im.size
    small = im.resize((int(w * 0.8), int(h * 0.8)))
    return ImageOps.expand(small, border=(int(w * 0.1), int(h * 0.1)), fill=(240, 240, 240))


TRANSFORMS = {
    "crop70": lambda im, r: crop(im, 0.7),
    "crop50off": lambda im, r: crop(im, 0.6, off=True, rng=r),
    "small160": lambda im, r: im.resize((160, max(1, round(160 * im.height / im.width)))),
    "jpeg15": lambda im, r: jpeg(im, 15),
    "rot10": lambda im, r: im.rotate(10, resample=Image.Resampling.BILINEAR, expand=False),
    "flip": lambda im, r: ImageOps.mirror(im),
    "gray": lambda im, r: ImageOps.grayscale(im).convert("RGB"),
    "bright": lambda im, r: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.4)).enhance(0.6),
    "blur": lambda im, r: im.filter(ImageFilter.GaussianBlur(3)),
    "text": lambda im, r: text(im, r),
    "border": lambda im, r: border(im),
}


def thumbnails(im: Image.Image) -> np.ndarray:
    """32x32 grey thumbnails of the whole picture and of its centre 60% (float, 0..255)."""
    grey = im.convert("L")
    return np.stack([np.asarray(t.resize((32, 32), Image.Resampling.BOX), np.float32) for t in (grey, crop(grey, 0.6))])


COLOUR_WORDS = re.compile(r"(?i)\b(mate|ubuntu|dark|light|cold|warm|radioactive|no-logo|logo)\b|[-_ ]+")


def wallpaper_of(path: Path) -> str:
    """The wallpaper a package's file is a version of: plasma's wallpapers/NAME/contents/images*/WxH, the
    NAME; else its folder and its name without colour and theme words (mate's Ubuntu-Mate-Dark-no-logo and
    Ubuntu-Mate-Cold-no-logo are one design, and Stripes and MATE-Stripes-Dark another)."""
    parts = path.parts
    if "wallpapers" in parts and "contents" in parts:
        return "plasma:" + parts[parts.index("contents") - 1]
    return f"name:{path.parent.name}/{COLOUR_WORDS.sub('', path.stem).lower()}"


FRAME_SHARE = 0.12  # of each side, the frame's band (--frame)


def framed(im: Image.Image, seed: int = 99) -> Image.Image:
    """The picture shrunk inside one textured frame, the same for every picture (seeded): an ornate frame a
    package puts around each of its portraits."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (1000, 1000), (150, 120, 40))
    draw = ImageDraw.Draw(canvas)
    for _ in range(3000):
        x, y, r = int(rng.integers(0, 1000)), int(rng.integers(0, 1000)), int(rng.integers(3, 14))
        colour = tuple(int(c) for c in rng.integers(40, 255, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(30, 20, 0))
    w, h = im.size
    out = canvas.resize((w, h), Image.Resampling.BILINEAR)
    inner = im.resize((round(w * (1 - 2 * FRAME_SHARE)), round(h * (1 - 2 * FRAME_SHARE))), Image.Resampling.LANCZOS)
    out.paste(inner, (round(w * FRAME_SHARE), round(h * FRAME_SHARE)))
    return out


def is_near_duplicate(thumbs: np.ndarray, kept: list[np.ndarray], max_diff: float = 6.0) -> bool:
    """Whether a thumbnail of the picture (whole or centre) is within `max_diff` grey levels on average
    of a thumbnail of a kept picture (whole or centre)."""
    return any(np.abs(thumbs[:, None] - k[None, :]).mean(axis=(2, 3)).min() < max_diff for k in kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-output" / "heldout")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-output" / "debian-wallpapers")
    ap.add_argument("--pictures", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--extra",
        type=Path,
        help="more source pictures (JPEGs), taken after the wallpapers, e.g. fetch_photos.py --gcompris's photographs",
    )
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP --extra photographs")
    ap.add_argument(
        "--frame",
        action="store_true",
        help="put every picture in one shared textured frame before its copies are made (an overlay they share)",
    )
    ap.add_argument(
        "--one-per-scene",
        action="store_true",
        help="of the --extra photographs, the first of each INRIA Holidays scene (holidays-dev's dev copy set)",
    )
    ap.add_argument(
        "--no-wallpapers",
        action="store_true",
        help="only the --extra pictures: a set that shares no picture with the sets built from the wallpapers",
    )
    ap.add_argument(
        "--keep-variants",
        action="store_true",
        help="skip no picture for its wallpaper alone: how the sets up to v7 were made (to rebuild them as they were)",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)
    sources = [] if args.no_wallpapers else debian_pictures(args.cache)
    rng.shuffle(sources)
    if args.extra:  # after the wallpapers: the first pictures of a set stay those of a set without them
        extra = sorted(args.extra.glob("*.jpg"))
        if args.one_per_scene:  # holidays numbering: a scene's photographs share all but their last two digits
            extra = list({int(p.stem) // 100: p for p in reversed(extra)}.values())[::-1]
        sources += extra[args.skip :]
    (args.out / "db").mkdir(parents=True, exist_ok=True)
    (args.out / "queries").mkdir(parents=True, exist_ok=True)
    gt, kept, skipped, taken = [], [], 0, set()
    for src in sources:
        if len(kept) == args.pictures:
            break
        im = Image.open(src).convert("RGB")
        if args.frame:
            im = framed(im)
        thumbs = thumbnails(im)
        wallpaper = wallpaper_of(src)
        if (not args.keep_variants and wallpaper in taken) or is_near_duplicate(thumbs, kept):
            skipped += 1
            continue
        taken.add(wallpaper)
        kept.append(thumbs)
        im.thumbnail((640, 640), Image.Resampling.LANCZOS)
        name = f"pic{len(kept) - 1:04d}"
        im.save(args.out / "db" / f"{name}.jpg", quality=90)
        for pair in rng.sample(list(combinations(sorted(TRANSFORMS), 2)), 4):
            a, b = rng.sample(pair, 2)
            q = TRANSFORMS[b](TRANSFORMS[a](im, rng), rng)
            qname = f"{name}_{a}+{b}.jpg"
            q.save(args.out / "queries" / qname, quality=90)
            gt.append({"query": qname, "positives": [f"{name}.jpg"]})
    (args.out / "groundtruth.json").write_text(json.dumps(gt, indent=1))
    print(f"{len(kept)} pictures ({skipped} near-duplicates skipped), {len(gt)} queries in {args.out}")


if __name__ == "__main__":
    main()
