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
