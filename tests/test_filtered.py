"""Search within a part of the collection: metadata files, the version's fields, the planner against brute
force at every selectivity, and filters in the CLI, duplicates and the API."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import clustered_vectors, write_synthetic_shards
from pipeline.cli import app
from pipeline.filters import FilterError
from pipeline.index import EXACT_BELOW, build_index, current_version, version_damage
from pipeline.rebuild import rebuild
from pipeline.search import Searcher

runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """6,000 clustered vectors in shards, with a metadata file: `r` uniform in [0, 1) (random selections)
    and `near` the cosine to one image (selecting `near>=t` is a cluster of similar pictures)."""
    tmp = tmp_path_factory.mktemp("filtered")
    x = clustered_vectors(6000, 32, clusters=40, seed=3)
    paths = write_synthetic_shards(tmp / "f", x, 1500)
    r = np.random.default_rng(0).random(len(x))
    near = x @ x[17]
    rows = [
        [p, f"{a:.6f}", f"{b:.6f}", ["red", "green", "blue"][i % 3]]
        for i, (p, a, b) in enumerate(zip(paths, r, near, strict=True))
    ]
    meta = write_csv(tmp / "meta.csv", ["path", "r", "near", "colour"], rows)
    return tmp, x, r, near, meta


@pytest.mark.parametrize(
    "factory, extra",
    [("Flat", {}), ("IVF40,Flat", {"nprobe": 4}), ("IVF40,PQ8", {"rerank": 60, "nprobe": 4})],
)
def test_filtered_search_finds_what_brute_force_over_the_selection_finds(synthetic, factory, extra):
    tmp, x, r, near, meta = synthetic
    out = tmp / f"index-{factory}"
    build_index(tmp / "f", out, factory=factory, metadata=[meta], progress=False, **extra)
    searcher = Searcher(out)
    queries = x[np.random.default_rng(1).choice(len(x), 30, replace=False)]
    cases = [(f"r<{f}", r < f) for f in (1.0, 0.3, 0.1, 0.01, 0.001)]
    cases += [(f"near>={t:.6f}", near >= t) for t in np.quantile(near, [0.9, 0.99, 0.999])]  # clustered
    for where, chosen in cases:
        selected = np.flatnonzero(chosen)
        found = searcher.search_vectors(queries, 10, where=[where])
        scores = queries @ x[selected].astype(np.float16).astype(np.float32).T  # the shards store float16
        recalls = []
        for hits, row in zip(found, scores, strict=True):
            truth = set(selected[np.argsort(-row)[: min(10, len(selected))]].tolist())
            assert {h.id for h in hits} <= set(selected.tolist()), where  # only selected images, ever
            recalls.append(len({h.id for h in hits} & truth) / len(truth))
        if len(selected) <= EXACT_BELOW and "PQ" not in factory:
            assert np.mean(recalls) == 1.0, where  # planned exact
        else:
            assert np.mean(recalls) >= 0.95, (where, np.mean(recalls))


def test_a_filter_that_selects_nothing_answers_empty_and_bad_filters_one_line(synthetic):
    tmp, x, _, _, meta = synthetic
    build_index(tmp / "f", tmp / "i-empty", metadata=[meta], progress=False)
    searcher = Searcher(tmp / "i-empty")
    assert searcher.search_vectors(x[:2], 5, where=["r<0", "colour=red"]) == [[], []]
    for bad, said in [
        ("colour<red", "holds text"),
        ("r<abc", "not a number"),
        ("shape=round", "no field shape"),
        ("r<", "r<"),
        ("colr=red", "did you mean colour"),
    ]:
        with pytest.raises(FilterError, match=said):
            searcher.search_vectors(x[:1], 5, where=[bad])
    hits = searcher.search_vectors(x[:1], 3, where=["colour in (red, blue)"])[0]
    assert {h.metadata["colour"] for h in hits} <= {"red", "blue"} and all("r" in h.metadata for h in hits)


@pytest.fixture()
def shop(tmp_path, gallery, tiny_model):
    """The gallery as a shop's catalogue: a CSV keyed by path (and by a glob for a whole folder)."""
    files = sorted(p for p in gallery.rglob("*") if p.is_file())
    rows = [
        [str(p), f"SKU{i:03d}", ["shoes", "bags"][i % 2], 20 + 15 * i, f"2019-0{1 + i % 9}-15"]
        for i, p in enumerate(files)
    ]
    rows.append([str(gallery / "nowhere.jpg"), "SKU999", "hats", 1, "2020-01-01"])  # unknown path
    rows.append([str(files[0]), "SKU000b", "shoes", "cheap", "2019-01-15"])  # again (wins), and a wrong type
    meta = write_csv(tmp_path / "products.csv", ["path", "sku", "category", "price", "listed"], rows)
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"path": str(gallery / "a" / "**"), "shelf": "A"}) + "\n" + "not json\n")
    return tmp_path / "work", files, meta, jsonl


def test_metadata_round_trip_through_rebuild_reports_bad_rows_and_filters(shop, gallery, tiny_model, caplog):
    work, files, meta, jsonl = shop
    caplog.set_level(logging.WARNING)
    report = rebuild([gallery], work, tiny_model, workers=0, progress=False, metadata=[meta, jsonl])
    sources = report.index_meta["metadata"]["sources"]
    assert [s["unknown"] for s in sources] == [1, 0] and sources[0]["duplicates"] == 1
    assert sources[0]["wrong_types"] == 1 and sources[1]["bad_rows"] == 1 and sources[1]["matched"] == 1
    assert report.index_meta["metadata"]["fields"] == {
        "size": "number",
        "mtime": "date",
        "width": "number",
        "height": "number",
        "sku": "string",
        "category": "string",
        "price": "number",
        "listed": "date",
        "shelf": "string",
    }
    assert "not in the index" in caplog.text and "is not a number" in caplog.text
    searcher = Searcher(work / "index")
    first = searcher.search_like([files[0]], k=3)[0].hits[0]
    assert (
        first.metadata["sku"] == "SKU000b" and first.metadata["price"] == 20
    )  # the last row won; its bad price left out
    assert first.metadata["width"] == 96 and first.metadata["height"] == 72 and first.metadata["size"] > 0
    shoes = searcher.search_like([files[1]], k=20, where=["category=shoes", "price<100"])[0].hits
    assert shoes and all(h.metadata["category"] == "shoes" and h.metadata["price"] < 100 for h in shoes)
    shelf = searcher.search_like([files[1]], k=20, where=["shelf=A"])[0].hits
    assert {h.path for h in shelf} == {str(p) for p in files if p.is_relative_to(gallery / "a")}
    in_a = searcher.search_like([files[1]], k=20, where=[f"path:{gallery}/a/**", "listed>=2019-03-01"])[0].hits
    assert in_a and all(h.path.startswith(f"{gallery}/a/") and h.metadata["listed"] >= "2019-03" for h in in_a)


def test_a_metadata_change_alone_publishes_a_version_without_a_model_run(shop, gallery, tiny_model, caplog):
    work, files, meta, _ = shop
    rebuild([gallery], work, tiny_model, workers=0, progress=False, metadata=[meta])
    before = current_version(work / "index")
    write_csv(meta, ["path", "sku", "category"], [[str(files[0]), "NEW", "sale"]])
    report = rebuild([gallery], work, tiny_model, workers=0, progress=False)  # the files it was made with
    after = current_version(work / "index")
    assert report.extract.extracted == 0 and report.index_meta["made_by"] == "metadata" and after != before
    assert (after / "index.faiss").stat().st_ino == (before / "index.faiss").stat().st_ino  # linked, not copied
    assert version_damage(after) == []  # every file checksummed, metadata/ included
    hit = Searcher(work / "index").search_like([files[0]], k=1)[0].hits[0]
    assert hit.metadata["sku"] == "NEW" and hit.metadata["category"] == "sale" and "price" not in hit.metadata
    # The file vanishes: nothing to publish for it; a new image later keeps the fields it gave (one warning).
    meta.unlink()
    assert not rebuild([gallery], work, tiny_model, workers=0, progress=False).index_built
    files[-1].unlink()
    caplog.set_level(logging.WARNING)
    report = rebuild([gallery], work, tiny_model, workers=0, progress=False)
    assert report.index_built and "cannot be read" in caplog.text
    hit = Searcher(work / "index").search_like([files[0]], k=1)[0].hits[0]
    assert hit.metadata["sku"] == "NEW"


def test_cli_search_and_duplicates_with_where(shop, gallery, tiny_model):
    work, files, meta, _ = shop
    rebuild([gallery], work, tiny_model, workers=0, progress=False, metadata=[meta])
    index = work / "index"
    out = json.loads(
        cli("search", "--like", files[1], "--index", index, "-k", "20", "--where", "category=bags", "--json").stdout
    )
    assert out[0]["results"] and all(h["metadata"]["category"] == "bags" for h in out[0]["results"])
    text = cli("search", "--like", files[1], "--index", index, "-k", "2").stdout
    assert "sku=SKU" in text  # the user's fields follow each hit
    empty = json.loads(cli("search", "--like", files[1], "--index", index, "--where", "price>10000", "--json").stdout)
    assert empty[0]["results"] == []  # selects nothing: an empty answer, exit 0
    bad = cli("search", "--like", files[1], "--index", index, "--where", "colour=red", code=2)
    assert "no field colour" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    groups = json.loads(
        cli("duplicates", "--index", index, "--threshold", "-1", "--where", "category=bags", "--json").stdout
    )
    members = {Path(i["path"]).name for g in groups for i in g["images"]}
    bags = {p.name for i, p in enumerate(files) if i % 2 == 1}
    assert members and members <= bags


def test_a_small_metadata_change_is_read_line_by_line_and_gives_what_a_whole_reading_gives(shop, gallery, tiny_model):
    from pipeline.index import republish_metadata

    work, files, _, _ = shop
    meta = write_csv(
        work.parent / "catalogue.csv",
        ["path", "sku", "price", "listed"],
        [[str(p), f"SKU{i}", 10 * i, f"2019-0{1 + i % 9}-01"] for i, p in enumerate(files)],
    )
    rebuild([gallery], work, tiny_model, workers=0, progress=False, metadata=[meta])
    lines = meta.read_text().splitlines()
    lines[2] = lines[2].replace("SKU1,", "SKU1-new,")  # a value changed
    lines[3] = f"{files[2]},SKU2,cheap,2019-03-01"  # a wrong type now
    del lines[4]  # a row gone: that image has no fields from this file any more
    lines.append(f"{gallery}/nowhere.jpg,SKU99,1,2020-01-01")  # an unknown path
    meta.write_text("\n".join(lines) + "\n")
    report = republish_metadata(work / "index", [meta], keep=3)
    assert report.meta["metadata"]["incremental"] is True
    source = report.meta["metadata"]["sources"][0]
    assert source["unknown"] == 1 and source["wrong_types"] == 1 and source["rows"] == len(files)
    incremental = Searcher(work / "index")
    with open(meta, "a") as f:  # the same image on a second line: which line wins is decided by a whole reading
        f.write(f"{files[0]},SKU0-again,5,2019-01-01\n")
    assert republish_metadata(work / "index", [meta], keep=3).meta["metadata"]["incremental"] is False
    assert Searcher(work / "index").search_like([files[0]], k=1)[0].hits[0].metadata["sku"] == "SKU0-again"
    meta.write_text("\n".join(lines) + "\n")
    assert republish_metadata(work / "index", [meta], keep=3).meta["metadata"]["incremental"] is False  # (dups)
    lines[2] = lines[2].replace("SKU1-new,", "SKU1-newer,")
    meta.write_text("\n".join(lines) + "\n")
    assert republish_metadata(work / "index", [meta], keep=3).meta["metadata"]["incremental"] is True
    incremental = Searcher(work / "index")
    whole = republish_metadata(work / "index", [meta.rename(meta.with_name("copy.csv"))], keep=3)  # another file
    assert whole.meta["metadata"]["incremental"] is False
    full = Searcher(work / "index")
    for name in ("sku", "price", "listed"):
        a, b = incremental.metadata, full.metadata
        assert a.fields[name] == b.fields[name]
        assert np.array_equal(np.asarray(a.column(name)), np.asarray(b.column(name)), equal_nan=True) or (
            a.fields[name] == "string"
            and [a.strings(name)[c] if c >= 0 else None for c in a.column(name)]
            == [b.strings(name)[c] if c >= 0 else None for c in b.column(name)]
        )


def test_a_glob_anywhere_in_the_file_makes_a_change_read_whole(shop, gallery, tiny_model):
    from pipeline.index import republish_metadata

    work, files, _, _ = shop
    rows = [[f"{gallery}/a/**", "folder-a"]] + [[str(p), f"own-{i}"] for i, p in enumerate(files)]
    meta = write_csv(work.parent / "labels.csv", ["path", "label"], rows)
    rebuild([gallery], work, tiny_model, workers=0, progress=False, metadata=[meta])
    meta.write_text(meta.read_text().replace("own-0", "own-0-new"))
    report = republish_metadata(work / "index", [meta], keep=3)
    assert report.meta["metadata"]["incremental"] is False  # the glob's order against each row decides
    hit = Searcher(work / "index").search_like([files[0]], k=1)[0].hits[0]
    assert hit.metadata["label"] == "own-0-new"


def test_binary_codes_rank_small_selections_exactly_and_large_ones_from_an_enlarged_pool(synthetic):
    tmp, x, r, _, meta = synthetic
    build_index(tmp / "f", tmp / "i-codes", codes="binary:32", metadata=[meta], recall_queries=200, progress=False)
    searcher = Searcher(tmp / "i-codes")
    queries = x[np.random.default_rng(2).choice(len(x), 20, replace=False)]
    stored = x.astype(np.float16).astype(np.float32)
    for share in (0.5, 0.1, 0.001):
        selected = np.flatnonzero(r < share)
        found = searcher.search_vectors(queries, 10, where=[f"r<{share}"])
        recalls = []
        for hits, q in zip(found, queries, strict=True):
            truth = set(selected[np.argsort(-(stored[selected] @ q))[:10]].tolist())
            assert {h.id for h in hits} <= set(selected.tolist())
            recalls.append(len({h.id for h in hits} & truth) / len(truth))
        assert np.mean(recalls) == 1.0 if len(selected) <= 2000 else np.mean(recalls) >= 0.8, (share, np.mean(recalls))


def counting_reader(x: np.ndarray):
    """A reader of rows of x by id, and the list of how many rows each call read."""
    reads: list[int] = []

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        reads.append(len(ids))
        return x[ids]

    return vectors_of, reads


def test_gathered_selections_rank_exactly_within_their_byte_budget():
    from pipeline.index import Gathered, Selection, ranked

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    vectors_of, reads = counting_reader(x)

    small, other = Selection(np.arange(0, 100, 2), 100), Selection(np.arange(1, 100, 2), 100)
    gathered = Gathered(budget=50 * 8 * 4)  # one selection of 50 at a time
    q = rng.standard_normal((3, 8)).astype(np.float32)
    m = gathered.matrix(small, vectors_of, 8)
    assert m is not None and gathered.matrix(small, vectors_of, 8) is m and reads == [50]  # gathered once
    scores, ids = ranked(m, small.ids, q, 5)
    truth = small.ids[np.argsort(-(q @ x[small.ids].T), axis=1)[:, :5]]
    assert (ids == truth).all() and np.all(np.diff(scores, axis=1) <= 0)
    assert gathered.matrix(other, vectors_of, 8) is not None and gathered.used == 50 * 8 * 4  # the older dropped
    assert gathered.matrix(Selection(np.arange(60), 100), vectors_of, 8) is None  # over the budget alone
    scores, ids = ranked(m[:2], small.ids[:2], q, 4)  # fewer than k: padded as faiss pads
    assert (ids[:, 2:] == -1).all() and np.isinf(scores[:, 2:]).all()


@pytest.mark.parametrize("factory, extra", [("IVF40,Flat", {"nprobe": 4}), ("IVF40,PQ8", {"rerank": 60, "nprobe": 4})])
def test_each_route_of_the_planner_keeps_recall_against_brute_force(synthetic, factory, extra, monkeypatch):
    from pipeline.index import filtered

    tmp, x, r, near, meta = synthetic
    for name, value in (("EXACT_BELOW", 100), ("STORE_EXACT_BELOW", 100), ("RERANK", 100)):
        monkeypatch.setattr(filtered, name, value)
    out = tmp / f"routes-{factory}"
    build_index(tmp / "f", out, factory=factory, metadata=[meta], progress=False, **extra)
    searcher = Searcher(out)
    queries = x[np.random.default_rng(4).choice(len(x), 30, replace=False)]
    stored = x.astype(np.float16).astype(np.float32)
    cases = [f"r<{f}" for f in (0.9, 0.6, 0.3, 0.1, 0.01)] + [
        f"near>={t:.6f}" for t in np.quantile(near, [0.7, 0.9, 0.99])
    ]
    routes = set()
    for where in cases:
        selection = searcher.select([where])
        assert selection is not None
        how = filtered.route(selection, compressed="PQ" in factory)
        routes.add(how)
        found = searcher.search_vectors(queries, 10, where=[where])
        recalls = []
        for hits, q in zip(found, queries, strict=True):
            truth = set(selection.ids[np.argsort(-(stored[selection.ids] @ q))[:10]].tolist())
            assert {h.id for h in hits} <= set(selection.ids.tolist()), where
            recalls.append(len({h.id for h in hits} & truth) / len(truth))
        assert np.mean(recalls) == 1.0 if how == "exact" else np.mean(recalls) >= 0.95, (where, how, np.mean(recalls))
    assert routes == {"exact", "codes", "lists"}
    fresh = Searcher(out)  # a service warms the versions it loads: the codebook is ready for the first filter
    fresh.warm()
    assert fresh.codebook.trained
    for name in ("EXACT_BELOW", "STORE_EXACT_BELOW"):  # a version every selection of which is ranked exactly
        monkeypatch.setattr(filtered, name, len(x))
    small = Searcher(out)
    small.warm()
    assert not small.codebook.trained


def test_a_selections_codes_are_made_once_and_count_against_the_budget():
    from pipeline.index import Codebook, Gathered, Selection, codes_search

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors_of, reads = counting_reader(x)

    codebook = Codebook(16)
    selection = Selection(np.arange(0, 3000, 3), 3000)
    gathered = Gathered(budget=1000 * codebook.code_bytes)
    codes = gathered.codes(selection, codebook, lambda: np.arange(3000), vectors_of)
    assert codes is not None and codes.ntotal == 1000 and gathered.used == 1000 * codebook.code_bytes == 4000
    assert gathered.codes(selection, codebook, lambda: np.arange(3000), vectors_of) is codes  # made once
    assert reads == [3000, 1000]  # the codebook's sample (once per searcher), then the selection
    q = rng.standard_normal((4, 16)).astype(np.float32)
    scores, ids = codes_search(codes, selection.ids, q, 5, vectors_of)
    truth = selection.ids[np.argsort(-(q @ x[selection.ids].T), axis=1)[:, :5]]
    assert (ids == truth).all() and np.all(np.diff(scores, axis=1) <= 0)  # (RERANK >= the selection: exact)
    assert gathered.codes(Selection(np.arange(1001), 3000), codebook, lambda: np.arange(3000), vectors_of) is None


def test_metadata_files_read_the_same_split_at_once_as_row_by_row(tmp_path):
    from pipeline.index import read_metadata_files

    paths = [f"/photos/{i:03d}.jpg" for i in range(50)]
    ids = np.arange(50, dtype=np.int64) * 3
    rows = [[p, f"{i * 1.5:g}", ["red", "blue"][i % 2], f"2019-06-0{1 + i % 9}"] for i, p in enumerate(paths)]
    rows[7][1] = ""  # a missing value
    rows[9][1] = "cheap"  # a wrong type
    header = ["path", "price", "colour", "listed"]
    plain = write_csv(tmp_path / "plain.csv", header, rows)  # no quotes: split at once
    assert '"' not in plain.read_text()
    quoted = tmp_path / "quoted.csv"  # the same rows, quoted: read by the csv module
    quoted.write_text("\n".join(",".join(f'"{v}"' for v in row) for row in [header, *rows]) + "\n")
    shuffled = write_csv(tmp_path / "shuffled.csv", header, rows[::-1])  # not in the index's order: looked up
    results = [read_metadata_files([f], paths, ids) for f in (plain, quoted, shuffled)]
    for fields, reports in results:
        assert {n: f.type for n, f in fields.items()} == {"price": "number", "colour": "string", "listed": "date"}
        assert reports[0].rows == 50 and reports[0].matched == 50 and reports[0].wrong_types == 1
        price = fields["price"]
        assert 7 not in price.rows and 9 not in price.rows and price.values[price.rows.tolist().index(4)] == 6.0
    for name in ("price", "colour", "listed"):
        a, b, c = (r[0][name] for r in results)
        assert np.array_equal(a.rows, b.rows) and list(a.values) == list(b.values)
        pairs = [sorted(zip(f.rows.tolist(), f.values.tolist(), strict=True)) for f in (a, c)]
        assert pairs[0] == pairs[1]
    ragged = tmp_path / "ragged.csv"  # a short row, a blank line, a row without a path: the csv module's way
    ragged.write_text("path,price\n/photos/000.jpg,1\n/photos/001.jpg\n\n,5\n/photos/002.jpg,3,extra\n")
    fields, reports = read_metadata_files([ragged], paths, ids)
    assert fields["price"].rows.tolist() == [0, 2] and reports[0].bad_rows == 1


@pytest.mark.parametrize(
    ("text", "values", "unknown"),
    [
        ("path,n\r\n/p/0.jpg,1\r\n/p/1.jpg,2\r\n", {0: 1.0, 1: 2.0}, 0),  # csv.writer's line ends
        ("\ufeffpath,n\n/p/0.jpg,1\n/p/1.jpg,2", {0: 1.0, 1: 2.0}, 0),  # a byte order mark, no last line end
        ("path,n\r\n/p/0.jpg,1\r\n/p/1.jpg,2", {0: 1.0, 1: 2.0}, 0),
        ("path,n\r\n/p/0.jpg,1\rx\r\n/p/1.jpg,2\r\n", {0: 1.0, 1: 2.0}, 1),  # a bare carriage return ends a row
        ("path,n\r\n/p/0.jpg,1\rx\n/p/1.jpg,2\r\n", {0: 1.0, 1: 2.0}, 1),
        ("path,n\n/p/0.jpg,1\n/p/1.jpg,2,3\n", {0: 1.0, 1: 2.0}, 0),  # a row too long: cut to the header
        ("path\n/p/0.jpg\n\n/p/1.jpg\n", {}, 0),  # one column and a blank line
    ],
)
def test_every_csv_layout_reads_as_the_csv_module_reads_it(tmp_path, text, values, unknown):
    from pipeline.index import read_metadata_files

    meta = tmp_path / "m.csv"
    meta.write_bytes(text.encode())
    fields, (report,) = read_metadata_files([meta], ["/p/0.jpg", "/p/1.jpg"], np.array([4, 9]))
    assert report.unknown == unknown and report.matched == 2
    got = dict(zip(fields["n"].rows.tolist(), fields["n"].values.tolist(), strict=True)) if "n" in fields else {}
    assert got == values


def test_a_files_rows_name_the_images_they_named_before_while_its_path_column_is_unchanged(tmp_path):
    from pipeline.index import KnownRows, read_metadata_files

    paths = [f"/photos/{i:03d}.jpg" for i in range(40)]
    ids = np.arange(40, dtype=np.int64) * 2
    rows = [[p, i] for i, p in enumerate(paths)][::-1] + [["/photos/none.jpg", 1], [paths[3], 99]]
    meta = write_csv(tmp_path / "m.csv", ["path", "n"], rows)  # not in the index's order, an unknown, a repeat
    _, (first,) = read_metadata_files([meta], paths, ids)
    assert first.positions is not None and first.unknown == 1 and first.duplicates == 1
    known = {str(meta): KnownRows(first.keys_sha256, first.positions, first.duplicates, first.unknown, first.globs)}

    def no_paths() -> list[str]:
        raise AssertionError("the id table's paths were read")

    write_csv(meta, ["path", "n"], [[p, n + 1000] for p, n in rows])  # every value changed, the paths kept
    taken, (again,) = read_metadata_files([meta], no_paths, ids, known)
    fresh, (scratch,) = read_metadata_files([meta], paths, ids)
    assert again.record() == scratch.record() and again.examples == scratch.examples
    assert np.array_equal(taken["n"].rows, fresh["n"].rows) and np.array_equal(taken["n"].values, fresh["n"].values)
    assert taken["n"].values[taken["n"].rows.tolist().index(3)] == 1099  # (the later row wins)
    write_csv(meta, ["path", "n"], [[paths[0], 1], *rows])  # a row more: looked up again
    with pytest.raises(AssertionError, match="paths were read"):
        read_metadata_files([meta], no_paths, ids, known)
