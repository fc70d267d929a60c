"""Progress for long work: a tqdm bar on a terminal, a periodic one-line log otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

LOG = logging.getLogger("pipeline")


class Progress:
    """Counts done items and failures; shows rate. `enabled=None` means "only on a terminal"."""

    def __init__(
        self, total: int, what: str, enabled: bool | None = None, log_every: float = 30.0, unit: str = "images"
    ) -> None:
        self.total, self.what, self.log_every, self.unit = total, what, log_every, unit
        self.done = self.failed = 0
        self.start = self.last_log = time.monotonic()
        use_bar = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True) if use_bar else None

    def update(self, n: int, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n)
            if failed:
                self.bar.set_postfix(failed=self.failed)
        elif time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            LOG.info("%s: %s", self.what, self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return f"{self.done}/{self.total} {self.unit}, {rate:.1f}/s, {self.failed} failed, {elapsed:.0f} s"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
