"""Fetch real photographs from Debian's wallpaper packages, for benchmarks and held-out evaluation.

Usage: python scripts/eval/fetch_photos.py --out bench-output/photos [--count 300]
       python scripts/eval/fetch_photos.py --gcompris bench-output/whitening
       python scripts/eval/fetch_photos.py --fresh bench-output/fresh-photos [--list scripts/eval/fresh_photos_v6.json]

Downloads mate-backgrounds and plasma-workspace-wallpapers with `apt-get download` (Debian's
registry; GPL/LGPL/CC-licensed artwork, see each package's copyright file; not redistributed
by this project), keeps each distinct picture of at least 2 megapixels, and writes `count`
JPEGs (quality 90) of 1-3 megapixels: seeded random crops of those pictures at random scales.
The pictures differ from shared/eval/copies-dev (which uses other packages).

--gcompris DIR writes instead the photographs bundled in Debian's gcompris-qt-data (GPL/CC-licensed
educational artwork: monuments, animals, landscapes, objects; inside Qt .rcc bundles), which no
evaluation set uses: the training photos of the learned whitening (scripts/eval/learn_whitening.py). Kept:
images of at least 200 px a side, without transparent, black-masked or white-background areas,
and with at least 600 distinct colours in a 64x64 thumbnail (drawings have few); activities of
drawings and jigsaw pieces are skipped.

--fresh DIR writes instead photographs from Debian packages that no other set uses, picked by eye, for a
held-out set: make_heldout.py --no-wallpapers --extra DIR. --list chooses the list: scripts/eval/fresh_photos.json
(the default: ten packages, held-out set v4), scripts/eval/fresh_photos_v5.json (fourteen other packages, held-out
set v5), scripts/eval/fresh_photos_v6.json (24 other packages, held-out set v6) or scripts/eval/fresh_photos_v9.json
(24 more: TeX and ConTeXt documentation, KDE, jQuery plugins' demos, JPEG XL test data; held-out set v9, the largest
download, 1.8 GB of packages). A list pins each package's
version (Debian 12), so the same pictures come back; each is written as `<package>-<file stem>.jpg`, RGB, long
side at most 1280 px, JPEG quality 92.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = ["mate-backgrounds", "plasma-workspace-wallpapers"]
FRESH_LIST = Path(__file__).with_name("fresh_photos.json")
GCOMPRIS_SKIP = (
    "details",
    "babyshapes",
    "leftright",
    "louis-braille",
    "chronos",
    "gravity",
    "digital_electricity",
    "hangman",
    "solar_system",
)  # activities of jigsaw pieces, hands and diagrams


def debian_pictures(workdir: Path, min_pixels: int = 2_000_000) -> list[Path]:
    """Distinct pictures of at least `min_pixels` from the wallpaper packages (downloaded once)."""
    root = workdir / "root"
    if not root.is_dir():
        subprocess.run(["apt-get", "download", "-qq", *PACKAGES], cwd=workdir, check=True)
        for deb in sorted(workdir.glob("*.deb")):  # only these packages: the cache may hold --fresh ones too
            if deb.name.split("_")[0] in PACKAGES:
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


def rcc_images(rcc: Path) -> list[bytes]:
    """The JPEG, PNG and WebP files inside a Qt .rcc bundle (stored uncompressed, after a 4-byte length)."""
    data, out = rcc.read_bytes(), []
    for magic in (b"\xff\xd8\xff", b"\x89PNG\r\n", b"RIFF"):
        at = data.find(magic)
        while at >= 4:
            size = int.from_bytes(data[at - 4 : at], "big")
            if 100 < size <= len(data) - at:
                out.append(data[at : at + size])
            at = data.find(magic, at + 1)
    return out


def gcompris_photos(workdir: Path, out: Path) -> int:
    """Write gcompris-qt-data's photographs (see the module docstring) as JPEGs into out; returns how many."""
    root = workdir / "gcompris"
    if not root.is_dir():
        subprocess.run(["apt-get", "download", "-qq", "gcompris-qt-data"], cwd=workdir, check=True)
        subprocess.run(["dpkg", "-x", str(next(workdir.glob("gcompris-qt-data_*.deb"))), str(root)], check=True)
    seen, kept = set(), 0
    for rcc in sorted(root.rglob("*.rcc")):
        if rcc.stem.startswith(GCOMPRIS_SKIP):
            continue
        for blob in rcc_images(rcc):
            digest = hashlib.sha1(blob).hexdigest()[:12]
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    im.load()
                    if digest in seen or min(im.size) < 200:
                        continue
                    rgba = np.asarray(im.convert("RGBA").resize((64, 64)))
            except Exception:  # not an image after all, or a truncated one
                continue
            rgb = rgba[..., :3].astype(int)
            if (
                (rgba[..., 3] < 250).mean() > 0.02
                or (rgb.sum(2) <= 12).mean() > 0.05
                or (rgb.min(2) >= 245).mean() > 0.25
                or len(np.unique(rgb.reshape(-1, 3) // 8, axis=0)) < 600
            ):
                continue
            seen.add(digest)
            with Image.open(io.BytesIO(blob)) as im:
                im.convert("RGB").save(out / f"{rcc.stem}-{digest}.jpg", quality=92)
            kept += 1
    return kept


def fresh_photos(workdir: Path, out: Path, listing: Path = FRESH_LIST) -> int:
    """Write the pictures of a list like fresh_photos.json (see the module docstring) as JPEGs into out; returns
    how many.

    A path ending in `@OFFSET` is an Enlightenment .edj file: the picture is the JPEG starting at that byte.
    """
    spec = json.loads(listing.read_text())
    versions, photos = spec["versions"], spec["photos"]
    # named as apt-get names the package file (an epoch's ":" escaped), which is found by that name below
    roots = {pkg: workdir / "fresh" / f"{pkg}_{version.replace(':', '%3a')}" for pkg, version in versions.items()}
    missing = [pkg for pkg in versions if not roots[pkg].is_dir()]
    if missing:
        subprocess.run(
            ["apt-get", "download", "-qq", *(f"{pkg}={versions[pkg]}" for pkg in missing)], cwd=workdir, check=True
        )
        (workdir / "fresh").mkdir(exist_ok=True)  # dpkg -x makes only the last folder
        for pkg in missing:
            deb = next(workdir.glob(f"{roots[pkg].name}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(roots[pkg])], check=True)
    names = [f"{pkg}-{Path(path.partition('@')[0]).stem}.jpg" for pkg, path in photos]
    if len(set(names)) < len(names):
        raise SystemExit(f"{listing}: two pictures of a package share a file stem")
    for name, (pkg, path) in zip(names, photos, strict=True):
        file, _, offset = path.partition("@")
        data = (roots[pkg] / file).read_bytes()
        with Image.open(io.BytesIO(data[int(offset or 0) :])) as im:
            rgb = im.convert("RGB")
        rgb.thumbnail((1280, 1280), Image.Resampling.LANCZOS)
        rgb.save(out / name, quality=92)
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-output/photos"))
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path("bench-output/debian-wallpapers"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gcompris", type=Path, help="write gcompris-qt-data's photographs here instead")
    ap.add_argument(
        "--fresh",
        type=Path,
        help="write here instead photographs from Debian packages that no other set uses, picked by eye "
        "(the --list file), for a held-out set: make_heldout.py --no-wallpapers --extra DIR",
    )
    ap.add_argument(
        "--list",
        type=Path,
        default=FRESH_LIST,
        help="--fresh's list of packages and pictures: scripts/eval/fresh_photos.json (held-out set v4, "
        "the default), scripts/eval/fresh_photos_v5.json (v5) or scripts/eval/fresh_photos_v6.json "
        "(v6)",
    )
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.gcompris:
        args.gcompris.mkdir(parents=True, exist_ok=True)
        return print(f"wrote {gcompris_photos(args.cache, args.gcompris)} photographs to {args.gcompris}")
    if args.fresh:
        args.fresh.mkdir(parents=True, exist_ok=True)
        return print(f"wrote {fresh_photos(args.cache, args.fresh, args.list)} photographs to {args.fresh}")
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
                args.out / f"photo{i:04d}.jpg", quality=90
            )
    print(f"wrote {args.count} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
