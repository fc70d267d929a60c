"""What every benchmark script shares: the targets line and recording a section in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def targets_line(targets: dict[str, bool]) -> str:
    return "Targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in targets.items()) + "."


def record(text: str, no_doc: bool) -> None:
    """Print a result section and, unless `no_doc`, append it to docs/benchmarks.md."""
    print(text)
    if not no_doc:
        with DOC.open("a") as fh:
            fh.write(text)


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The host's speed: float32 matrix product GFLOP/s through numpy (best of `repeats`), to set beside every figure."""
    import time

    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 / best / 1e9, 1)
