"""Progress without a terminal: periodic one-line logs with counts, rate and failures."""

from __future__ import annotations

import logging

from pipeline.progress import Progress


def test_periodic_log_line_without_terminal(caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    with Progress(10, "extract", enabled=False, log_every=0) as bar:
        bar.update(3)
        bar.update(1, failed=1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[-1].startswith("extract: 4/10 images, ") and "1 failed" in lines[-1]
    assert "/s" in lines[-1] and bar.bar is None
