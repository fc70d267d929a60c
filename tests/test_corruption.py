"""Damaged or unwritable files never give a traceback: every command exits 1 with one line that names
the file and says what to do, or recovers by itself (exit 0); nothing that was intact is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import save_pattern
from pipeline.cli import app
from pipeline.index import CURRENT_FILE, current_version
from pipeline.search import Searcher

runner = CliRunner()

COMMANDS = ("extract", "build-index", "search", "like", "rebuild", "eval")
DAMAGES = ("truncate", "random", "delete")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model) -> Path:
    """A workdir made by `pipeline rebuild`: two shards (one also records a failure), a catalog with
    its -wal and -shm, errors.jsonl, locks, a published index; and a ground truth over the gallery."""
    root = tmp_path_factory.mktemp("pristine")
    for i in range(12):
        save_pattern(root / "gallery" / f"img{i:02d}.png", seed=i)
    (root / "gallery" / "broken.jpg").write_text("not an image")
    (root / "gt.json").write_text(json.dumps([{"query": "img00.png", "positives": ["img01.png"]}]))
    result = runner.invoke(
        app,
        [
            "rebuild",
            str(root / "gallery"),
            "--workdir",
            str(root / "work"),
            "--model",
            str(tiny_model),
            "--workers",
            "0",
            "--shard-size",
            "6",
        ],
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    # A run killed after a catalog write leaves catalog.sqlite-wal and -shm beside it: keep that state.
    db = sqlite3.connect(root / "work" / "features" / "catalog.sqlite")
    with db:
        db.execute("UPDATE images SET status = status")
    shutil.copytree(root / "work", root / "killed")
    db.close()  # checkpoints and removes the -wal of the original, not of the copy
    shutil.rmtree(root / "work")
    (root / "killed").rename(root / "work")
    return root


def command(name: str, root: Path, work: Path, model: Path) -> list[str]:
    gallery, features, index = root / "gallery", work / "features", work / "index"
    query = gallery / "img00.png"
    return [
        str(a)
        for a in {
            "extract": ["extract", gallery, "--out", features, "--model", model, "--workers", "0", "--shard-size", "6"],
            "build-index": ["build-index", features, "--out", index],
            "search": ["search", query, "--index", index, "--model", model],
            "like": ["search", "--like", query, "--index", index],
            "rebuild": ["rebuild", gallery, "--workdir", work, "--model", model, "--workers", "0", "--shard-size", "6"],
            "eval": [
                "eval",
                "--index",
                index,
                "--groundtruth",
                root / "gt.json",
                "--queries",
                gallery,
                "--model",
                model,
            ],
        }[name]
    ]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(len(data)).bytes(max(len(data), 16)))
    else:
        path.unlink()


def kind(rel: str) -> str:
    name = Path(rel).name
    if name.startswith("shard-"):
        return "shard"
    return {
        "catalog.sqlite": "catalog",
        "catalog.sqlite-wal": "journal",
        "catalog.sqlite-shm": "journal",
        "errors.jsonl": "errors",
        ".lock": "lock",
        CURRENT_FILE: "current",
    }.get(name, "version")


def expected_exit(rel: str, how: str, cmd: str) -> int:
    """0 where the product recovers by itself, 1 where the user must act (the message says how)."""
    k = kind(rel)
    if k in ("errors", "lock", "journal"):
        # errors.jsonl is rewritten by every extract; a lock file only holds a pid; SQLite drops a
        # damaged -wal (what it held was also in the shards, and extract imports them again) and rebuilds -shm.
        return 0
    if k == "shard":
        # Search reads only the index, so it still answers. A deleted shard is forgotten and its images
        # are extracted again by extract and rebuild (build-index alone says to run extract first); rebuild
        # deletes a damaged one first (its scrub); extract and build-index name it for the user.
        return 0 if cmd in ("search", "like", "eval", "rebuild") or how == "delete" and cmd != "build-index" else 1
    if k == "catalog":
        # A deleted catalog is rebuilt from the shards (it is derived state); a corrupt one is not
        # deleted behind the user's back.
        return 0 if cmd in ("search", "like", "eval") or how == "delete" else 1
    # CURRENT or a file of the published version: readers need the user; build-index and rebuild
    # publish a new version (rebuild notices that the published one does not open).
    return 0 if cmd in ("extract", "build-index", "rebuild") else 1


def files_of(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())


# rewritten by a run
REWRITTEN = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "errors.jsonl", ".lock", CURRENT_FILE)


def test_the_fixture_has_every_kind_of_file(pristine):
    names = files_of(pristine / "work")
    assert {kind(n) for n in names} == {"shard", "catalog", "journal", "errors", "lock", "current", "version"}
    # index.faiss, ids.sqlite, meta.json, and metadata/: fields.json, ids.npy and a column per built-in field
    assert sum(kind(n) == "shard" for n in names) >= 2 and sum(kind(n) == "version" for n in names) == 9


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.slow
def test_every_command_against_every_damaged_file(pristine, tiny_model, tmp_path, how):
    for rel in files_of(pristine / "work"):
        if "/metadata/f-" in rel and not rel.endswith("/f-size.npy"):
            continue  # one column stands for all: they are written and read alike
        for cmd in COMMANDS:
            work = tmp_path / f"{cmd}-{rel.replace('/', '_')}"
            shutil.copytree(pristine / "work", work)
            damage(work / rel, how)
            intact = {n: (work / n).read_bytes() for n in files_of(work) if n != rel and Path(n).name not in REWRITTEN}
            result = runner.invoke(app, command(cmd, pristine, work, tiny_model))
            where = (rel, how, cmd, result.exit_code, result.stderr)
            assert isinstance(result.exception, (SystemExit, type(None))), (*where, result.exception)
            assert "Traceback" not in result.output + result.stderr and "internal error" not in result.stderr, where
            assert result.exit_code == expected_exit(rel, how, cmd), where
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            if result.exit_code:
                assert len(errors) == 1 and "`pipeline " in errors[0], where
                assert Path(rel).name in errors[0], where  # the message names the damaged file
            else:
                assert not errors, where
            for name, data in intact.items():  # nothing intact is lost
                assert (work / name).read_bytes() == data, (*where, name)
            if kind(rel) == "errors" and cmd in ("extract", "rebuild"):  # rewritten whole
                assert (work / rel).read_bytes() == (pristine / "work" / rel).read_bytes(), where
            if kind(rel) not in ("current", "version") or cmd in ("build-index", "rebuild"):  # the index answers
                searcher = Searcher(work / "index")
                answer = searcher.search_like(searcher.indexed_paths()[:1], k=3)[0]
                assert answer.hits and not answer.error, where
            shutil.rmtree(work)


def one_error(result, code: int = 1) -> str:
    """The single `error:` line of a failed command (no traceback, no internal error)."""
    assert result.exit_code == code and isinstance(result.exception, SystemExit), (result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture()
def work(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine / "work", tmp_path / "work"))


@pytest.mark.parametrize("name", ["v20990101T000000000000Z", "../..", "../../index", ".tmp-v1-1", ""])
def test_current_naming_a_missing_or_escaping_version(pristine, work, name):
    (work / "index" / CURRENT_FILE).write_text(name + "\n")
    line = one_error(runner.invoke(app, command("like", pristine, work, Path())))
    assert f"{work / 'index' / CURRENT_FILE} " in line and "`pipeline build-index`" in line
    assert runner.invoke(app, command("build-index", pristine, work, Path())).exit_code == 0  # publishing repairs it
    assert Searcher(work / "index").count == 12


@pytest.mark.parametrize("missing", ["hashes", "features", "errors/reasons"])
def test_shard_missing_a_dataset_and_the_advice_that_fixes_it(pristine, work, tiny_model, missing):
    shard = work / "features" / "shard-00000.h5"
    with h5py.File(shard, "r+") as f:
        del f[missing]
    line = one_error(runner.invoke(app, command("build-index", pristine, work, tiny_model)))
    assert str(shard) in line and missing.split("/")[-1] in line and "delete it and rerun `pipeline extract`" in line
    shard.unlink()  # what the message says to do
    out = runner.invoke(app, [*command("extract", pristine, work, tiny_model), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["extracted"] == 6  # its images, extracted again
    assert runner.invoke(app, command("build-index", pristine, work, tiny_model)).exit_code == 0
    assert runner.invoke(app, command("search", pristine, work, tiny_model)).exit_code == 0
    assert Searcher(work / "index").count == 12


def test_corrupt_catalog_and_the_advice_that_fixes_it(pristine, work, tiny_model):
    catalog = work / "features" / "catalog.sqlite"
    damage(catalog, "random")
    line = one_error(runner.invoke(app, command("extract", pristine, work, tiny_model)))
    assert str(catalog) in line and "delete it" in line
    catalog.unlink()
    out = runner.invoke(app, [*command("extract", pristine, work, tiny_model), "--json"])
    report = json.loads(out.stdout)
    assert out.exit_code == 0 and report["extracted"] == 0 and report["unchanged"] == 12  # rebuilt from the shards


def test_full_disk_says_so_and_keeps_what_was_published(pristine, work, tiny_model, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    published = current_version(work / "index")
    monkeypatch.setattr(os, "fsync", full)  # where a full disk shows on a real filesystem too
    line = one_error(
        runner.invoke(
            app,
            [
                "extract",
                str(pristine / "gallery"),
                "--out",
                str(tmp_path / "f"),
                "--model",
                str(tiny_model),
                "--workers",
                "0",
            ],
        )
    )
    assert "the disk is full" in line and "shard-00000.h5" in line and "`pipeline extract`" in line
    assert not [p for p in (tmp_path / "f").iterdir() if p.suffix in (".h5", ".tmp")]  # no half-written shard
    line = one_error(runner.invoke(app, command("build-index", pristine, work, tiny_model)))
    assert "the disk is full" in line and "`pipeline build-index`" in line
    monkeypatch.undo()
    assert current_version(work / "index") == published
    assert [p.name for p in (work / "index" / "versions").iterdir()] == [published.name]
    assert Searcher(work / "index").count == 12


def test_unwritable_outputs(pristine, work, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    gallery, model = str(pristine / "gallery"), str(tiny_model)
    cases = [
        ["extract", gallery, "--out", str(blocker / "features"), "--model", model, "--workers", "0"],
        ["build-index", str(work / "features"), "--out", str(blocker / "index")],
        ["rebuild", gallery, "--workdir", str(blocker / "work"), "--model", model, "--workers", "0"],
        ["rebuild", gallery, "--workdir", str(work), "--model", model, "--log-file", str(blocker / "log")],
        [*command("eval", pristine, work, tiny_model), "--per-query", str(blocker / "rows.csv")],
        [*command("eval", pristine, work, tiny_model), "--per-query", str(tmp_path)],  # a folder
    ]
    for args in cases:
        line = one_error(runner.invoke(app, args))
        assert "cannot write" in line and "`pipeline " in line, (args, line)


def test_groundtruth_query_whose_only_positive_is_itself(pristine, work, tiny_model, tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps([{"query": "img00.png", "positives": ["img00.png"]}]))
    args = [
        "eval",
        "--index",
        str(work / "index"),
        "--groundtruth",
        str(gt),
        "--queries",
        str(pristine / "gallery"),
        "--model",
        str(tiny_model),
    ]
    assert "img00.png: no positive left" in one_error(runner.invoke(app, args))


def test_an_untranslated_error_is_one_internal_error_line_and_v_shows_the_traceback(pristine, work, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("pipeline.index.build_index", bug)
    args = command("build-index", pristine, work, Path())
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [
        "error: internal error (ZeroDivisionError: a bug); please report it; "
        "rerun as `pipeline -v ...` for the traceback"
    ]
    verbose = runner.invoke(app, ["-v", *args])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "ZeroDivisionError: a bug" in verbose.stderr
