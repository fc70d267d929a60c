"""Decode pool: workers that die idle or cannot start, and pixels that outlive their slots."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import save_pattern
from pipeline.decode_pool import DecodePool, DecodeSettings
from pipeline.errors import PipelineError
from pipeline.images import load_image

SETTINGS = DecodeSettings(16, 10**8, 30.0)


def test_worker_dying_while_idle_is_replaced(tmp_path):
    paths = [str(save_pattern(tmp_path / f"{i}.png", i)) for i in range(3)]
    with DecodePool(2, SETTINGS, prefetch=1) as pool:  # worker i gets image i; image 2 waits
        out = {}
        for i, decoded, error in pool.imap(paths):
            out[i] = (decoded, error)
            if len(out) == 1:  # worker i is idle now: it dies before the pool hands it image 2
                pool.procs[i].kill()
                pool.procs[i].join()
        assert set(out) == {0, 1, 2} and all(d is not None and e is None for d, e in out.values())
        again = list(pool.imap(paths))  # the pool still has two working decoders
    assert sorted(i for i, _, _ in again) == [0, 1, 2] and all(e is None for _, _, e in again)


UNSTARTABLE = """
import os

if os.environ.get("UNSTARTABLE_BROKEN"):  # as if a worker could not import its decoder
    raise ImportError("this decoder cannot be imported in a worker")


def decode(path, settings, use_alarm):
    raise AssertionError("never called")
"""


def test_workers_that_cannot_start_fail_the_run(tmp_path, monkeypatch):
    (tmp_path / "unstartable.py").write_text(UNSTARTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from unstartable import decode

    monkeypatch.setenv("UNSTARTABLE_BROKEN", "1")  # workers import the module again, with this set
    paths = [str(save_pattern(tmp_path / f"{i}.png", i)) for i in range(4)]
    with DecodePool(2, SETTINGS, decode=decode) as pool:
        with pytest.raises(PipelineError, match="decoder worker processes cannot start") as err:
            list(pool.imap(paths))
    assert "exit code 1" in str(err.value) and "\n" not in str(err.value)


def test_pixels_outlive_slots_and_pool(tmp_path):
    paths = [str(save_pattern(tmp_path / f"{i}.png", i)) for i in range(5)]
    with DecodePool(1, SETTINGS, prefetch=1) as pool:  # one slot, reused for every image
        got = {i: d.pixels for i, d, _ in pool.imap(paths)}
    for i, path in enumerate(paths):  # after slot reuse and after the shared memory is gone
        np.testing.assert_array_equal(got[i], load_image(path, SETTINGS.size).pixels)
