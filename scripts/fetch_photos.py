"""Fetch real photographs from Debian's wallpaper packages, for benchmarks and held-out evaluation.

Usage: python scripts/fetch_photos.py --out bench-output/photos [--count 300]

Downloads mate-backgrounds and plasma-workspace-wallpapers with `apt-get download` (Debian's
registry; GPL/LGPL/CC-licensed artwork, see each package's copyright file; not redistributed
by this project), keeps each distinct picture of at least 2 megapixels, and writes `count`
JPEGs (quality 90) of 1-3 megapixels: seeded random crops of those pictures at random scales.
The pictures differ from shared/eval/copies-dev (which uses other packages).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = ["mate-backgrounds", "plasma-workspace-wallpapers"]


def debian_pictures(workdir: Path, min_pixels: int = 2_000_000) -> list[Path]:
    """Distinct pictures of at least `min_pixels` from the wallpaper packages (downloaded once)."""
    root = workdir / "root"
    if not root.is_dir():
        subprocess.run(["apt-get", "download", "-qq", *PACKAGES], cwd=workdir, check=True)
        for deb in sorted(workdir.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    seen, out = set(), []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png") or "screenshot" in p.name or not p.is_file():
            continue
        digest = hashlib.sha1(p.read_bytes()).hexdigest()
        with Image.open(p) as im:
            if digest in seen or im.width * im.height < min_pixels:
                continue
        seen.add(digest)
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-output/photos"))
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path("bench-output/debian-wallpapers"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = debian_pictures(args.cache)
    print(f"{len(sources)} distinct pictures of >= 2 MP")
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        with Image.open(sources[i % len(sources)]) as im:
            im = im.convert("RGB")
            megapixels = rng.uniform(1.0, 3.0)
            aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3])
            w = int(round(np.sqrt(megapixels * 1e6 * aspect)))
            h = int(round(w / aspect))
            scale = rng.uniform(max(w / im.width, h / im.height), 1.0) if w <= im.width and h <= im.height else 1.0
            cw, ch = min(im.width, int(w / scale)), min(im.height, int(h / scale))
            x, y = rng.integers(0, im.width - cw + 1), rng.integers(0, im.height - ch + 1)
            im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.LANCZOS).save(
                args.out / f"photo{i:04d}.jpg", quality=90)
    print(f"wrote {args.count} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
