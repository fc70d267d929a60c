"""End to end through the CLI: extract -> build-index -> search, exit codes, messages and help."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from helpers import centre_crop, save_pattern, write_tiny_model
from pipeline.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture()
def built(tmp_path, gallery, tiny_model):
    run("extract", gallery, "--out", tmp_path / "features", "--model", tiny_model, "--workers", "1")
    run("build-index", tmp_path / "features", "--out", tmp_path / "index")
    return tmp_path / "index"


def test_crop_finds_original_first(built, gallery, tiny_model, tmp_path):
    originals = sorted(gallery.rglob("img0[0-5].*"))
    crops = [centre_crop(p, tmp_path / f"crop_{p.stem}.png") for p in originals]
    out = run("search", *crops, "--index", built, "--model", tiny_model, "-k", "5", "--json").stdout
    results = json.loads(out)
    assert [r["query"] for r in results] == [str(c) for c in crops]
    for r, original in zip(results, originals, strict=True):
        assert len(r["results"]) == 5
        assert [h["rank"] for h in r["results"]] == [1, 2, 3, 4, 5]
        assert r["results"][0]["path"] == str(original)
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0 + 1e-6


def test_k_larger_than_collection_returns_all(built, gallery, tiny_model):
    query = sorted(gallery.rglob("*.jpg"))[0]
    results = json.loads(run("search", query, "--index", built, "--model", tiny_model, "-k", "50", "--json").stdout)
    assert len(results[0]["results"]) == 12


def test_text_output(built, gallery, tiny_model):
    query = sorted(gallery.rglob("*.jpg"))[0]
    out = run("search", query, "--index", built, "--model", tiny_model, "-k", "3").stdout
    lines = out.splitlines()
    assert lines[0] == f"query: {query}"
    assert lines[1].split()[0] == "1" and lines[1].split()[2] == str(query)
    assert len(lines) == 4


def test_bad_query_is_reported_others_answer(built, gallery, tiny_model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    good = sorted(gallery.rglob("*.jpg"))[0]
    result = run("search", bad, good, "--index", built, "--model", tiny_model, "-k", "2", "--json", code=1)
    results = json.loads(result.stdout)
    assert "not an image" in results[0]["error"] and results[0]["results"] == []
    assert len(results[1]["results"]) == 2
    assert "not an image" in result.stderr


def test_other_model_is_refused(built, gallery, tmp_path):
    other = write_tiny_model(tmp_path / "other.onnx", seed=7)
    query = sorted(gallery.rglob("*.jpg"))[0]
    result = run("search", query, "--index", built, "--model", other, code=1)
    assert "index was built with model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_user_errors_are_one_line(tmp_path, tiny_model):
    cases = [
        (["extract", tmp_path / "missing", "--out", tmp_path / "f", "--model", tiny_model], "folder not found"),
        (["build-index", tmp_path / "missing", "--out", tmp_path / "i"], "features folder not found"),
        (["search", tmp_path / "q.jpg", "--index", tmp_path / "missing"], "index folder not found"),
        (["search", tmp_path / "q.jpg", "--index", tmp_path, "-k", "0"], "-k must be at least 1"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    empty = ["extract", tmp_path / "empty", "--out", tmp_path / "f", "--model", tiny_model]
    cases.append((empty, "no image files found"))
    for args, message in cases:
        result = run(*args, code=1)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_strict_exit_code(tmp_path, tiny_model):
    save_pattern(tmp_path / "imgs" / "ok.png", 1)
    (tmp_path / "imgs" / "broken.jpg").write_text("x")
    args = ["extract", tmp_path / "imgs", "--out", tmp_path / "f", "--model", tiny_model, "--workers", "0"]
    assert "broken.jpg: not an image" in run(*args).stderr
    rerun = run(*args, "--strict", code=3)  # nothing new to do, but the folder still holds a failure
    assert "1 files could not be used (0 in this run)" in rerun.stderr


def test_search_uses_the_model_recorded_in_the_index(built, gallery):
    query = sorted(gallery.rglob("*.jpg"))[0]
    results = json.loads(run("search", query, "--index", built, "-k", "1", "--json").stdout)
    assert results[0]["results"][0]["path"] == str(query)


def command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the app, as the words that name it: a new one is found by itself."""
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():  # only groups have sub-commands
        paths += command_paths(sub, prefix + (name,))
    return paths


def test_every_command_has_help():
    commands = command_paths(typer.main.get_command(app))
    assert {("rebuild",), ("eval",), ("model", "quantize"), ("model", "export"), ("model", "info")} <= set(commands)
    for cmd in commands:
        out = run(*cmd, "--help").stdout
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        assert " ".join(cmd) in usage and len(out.splitlines()) > 5, (cmd, usage)


def test_usage_errors_exit_2_not_internal_error(tmp_path):
    """Usage mistakes belong to the command-line framework (exit 2), never to the last-resort handler."""
    for args in (
        ["extract", "--bogus"],
        ["search", "q.jpg"],
        ["build-index", str(tmp_path), "--out", str(tmp_path), "--keep", "many"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "internal error" not in result.output
