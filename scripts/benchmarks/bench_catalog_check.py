"""What the catalog's damage check (PRAGMA quick_check, run by every Catalog() open) costs, beside the
catalog work every extract does anyway (reading all entries), on a catalog of N images.

    python scripts/benchmarks/bench_catalog_check.py [--images 1000000]

Target: the check <= 0.25 x reading the entries. Writes its figures into docs/benchmarks/results/catalog.json
(--json).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchlib import add_json_option, command_line, figure, host, now, save  # noqa: E402
from pipeline.features import CATALOG_FILE, Catalog  # noqa: E402

AREA, TITLE = "catalog", "Catalog damage check"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    add_json_option(ap, AREA)
    args = ap.parse_args()
    date = now()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with Catalog(folder) as catalog:
            for s in range(0, args.images, 512):
                catalog.record_shard(
                    f"shard-{s // 512:05d}.h5",
                    [
                        (f"/photos/{s // 512:05d}/img{r:04d}.jpg", 123_456, 1.7e9 + r, f"{s + r:032x}", r)
                        for r in range(min(512, args.images - s))
                    ],
                    [],
                )
        size_mib = (folder / CATALOG_FILE).stat().st_size / 2**20
        machine = host()
        db = sqlite3.connect(folder / CATALOG_FILE)
        check = min(_timed(lambda: db.execute("PRAGMA quick_check").fetchall()) for _ in range(3))
        db.close()
        opened = min(_timed(lambda: Catalog(folder).close()) for _ in range(3))
        with Catalog(folder) as catalog:
            entries = min(_timed(catalog.entries) for _ in range(3))
    res = {
        "images": args.images,
        "catalog_mib": round(size_mib),
        "quick_check_s": round(check, 2),
        "open_s": round(opened, 2),
        "entries_s": round(entries, 2),
        "ratio": round(check / entries, 2),
    }
    save(
        args.json,
        AREA,
        TITLE,
        key="default",
        date=date,
        command=command_line(),
        host=machine,
        dim=None,
        setup=setup(res),
        figures=figures(res),
        result=res,
    )


def setup(res: dict) -> str:
    return (
        f"A catalog of {res['images']:,} images ({res['catalog_mib']} MiB, warm page cache): `PRAGMA quick_check`, "
        "which every open of the catalog runs, against reading all its entries, which every extract does; best of 3 "
        "each."
    )


def figures(res: dict) -> list[dict]:
    return [
        figure(
            "`PRAGMA quick_check` / reading the entries",
            res["ratio"],
            "×",
            f"{res['quick_check_s']} vs {res['entries_s']} s",
            target="≤ 0.25",
            met=res["ratio"] <= 0.25,
        ),
        figure("opening the catalog, check included", res["open_s"], " s"),
    ]


if __name__ == "__main__":
    main()
