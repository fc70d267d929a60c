"""What the catalog's damage check (PRAGMA quick_check, run by every Catalog() open) costs, beside the
catalog work every extract does anyway (reading all entries), on a catalog of N images.

    flock /tmp/pipeline-bench.lock python scripts/bench_catalog_check.py [--images 1000000] [--no-doc]
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import record, sgemm_gflops, targets_line  # noqa: E402
from pipeline.features import CATALOG_FILE, Catalog  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--no-doc", action="store_true", help="Print only; do not append to docs/benchmarks.md.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with Catalog(folder) as catalog:
            for s in range(0, args.images, 512):
                catalog.record_shard(f"shard-{s // 512:05d}.h5", [
                    (f"/photos/{s // 512:05d}/img{r:04d}.jpg", 123_456, 1.7e9 + r, f"{s + r:032x}", r)
                    for r in range(min(512, args.images - s))], [])
        size_mib = (folder / CATALOG_FILE).stat().st_size / 2**20
        gflops = sgemm_gflops()
        db = sqlite3.connect(folder / CATALOG_FILE)
        check = min(_timed(lambda: db.execute("PRAGMA quick_check").fetchall()) for _ in range(3))
        db.close()
        opened = min(_timed(lambda: Catalog(folder).close()) for _ in range(3))
        with Catalog(folder) as catalog:
            entries = min(_timed(catalog.entries) for _ in range(3))
    ratio = check / entries
    text = (f"\n### Catalog damage check — {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
            f"({platform.machine()}, numpy sgemm {gflops:.0f} GFLOP/s)\n\n"
            f"`flock /tmp/pipeline-bench.lock python scripts/bench_catalog_check.py --images {args.images}`\n\n"
            f"A catalog of {args.images:,} images ({size_mib:.0f} MiB, warm page cache): `PRAGMA quick_check` "
            f"{check:.2f} s; opening the catalog (check included) {opened:.2f} s; reading its entries, which every "
            f"extract does, {entries:.2f} s. The check costs **{ratio:.2f}×** that read.\n\n"
            + targets_line({"check_le_0.25x_entries": ratio <= 0.25}) + "\n")
    record(text, args.no_doc)


if __name__ == "__main__":
    main()
