"""Near-duplicate groups: copies -> one group, distinct pictures -> none, byte-identical files always,
every index kind against exact connected components, the CLI's outputs, and nothing touched."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import clustered_vectors, save_pattern, write_synthetic_shards
from pipeline import duplicates
from pipeline.cli import app
from pipeline.duplicates import DuplicateGroup, find_groups, pairs, pairs_above, roots, union
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.index import build_index
from pipeline.model import POOLINGS, ModelInfo
from pipeline.search import Searcher

runner = CliRunner()
# The tiny random-weight model maps distinct patterns to cosines up to ~0.99 and a picture's
# resized or recompressed copies to > 0.999: the real model's calibrated default does not apply.
TINY_THRESHOLD = 0.998


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def _index_of(root: Path, tmp_path: Path, model: Path) -> Path:
    extract([root], tmp_path / "features", model, workers=0, progress=False)
    build_index(tmp_path / "features", tmp_path / "index", progress=False)
    return tmp_path / "index"


@pytest.fixture()
def photos(tmp_path, tiny_model):
    """Six distinct pictures; the first also as a half-size copy and a JPEG q40 copy. Returns the
    index folder, the collection folder and the first picture's three files, best first."""
    root = tmp_path / "photos"
    for seed in range(6):
        save_pattern(root / f"pic{seed}.png", seed=seed, size=(192, 144))
    (root / "copies").mkdir()
    with Image.open(root / "pic0.png") as original:
        original.resize((96, 72)).save(root / "copies" / "pic0_small.png")
        original.save(root / "copies" / "pic0_q40.jpg", quality=40)
    copies = [root / "pic0.png", root / "copies" / "pic0_q40.jpg", root / "copies" / "pic0_small.png"]
    return _index_of(root, tmp_path, tiny_model), root, copies


def test_picture_and_its_copies_form_one_group_best_first(photos):
    index, _, copies = photos
    groups = find_groups(index, TINY_THRESHOLD, progress=False)
    assert len(groups) == 1 and isinstance(groups[0], DuplicateGroup) and groups[0].group == 1
    images = groups[0].images
    # Most pixels first; of the two full-size files, the one with more bytes (the PNG).
    assert [i.path for i in images] == [str(p) for p in copies]
    assert (images[0].width, images[0].height, images[0].bytes) == (192, 144, copies[0].stat().st_size)
    assert (images[2].width, images[2].height) == (96, 72)
    assert images[0].score_to_first == pytest.approx(1.0, abs=1e-4)
    assert all(TINY_THRESHOLD <= i.score_to_first <= 1.0001 for i in images)


def test_distinct_pictures_make_no_group(tmp_path, gallery, tiny_model):
    assert find_groups(_index_of(gallery, tmp_path, tiny_model), TINY_THRESHOLD, progress=False) == []


@pytest.mark.parametrize("threshold", [1.0, -1.0])
def test_byte_identical_files_are_one_group_at_any_threshold(tmp_path, gallery, tiny_model, threshold):
    first = sorted(gallery.rglob("*.jpg"))[0]
    shutil.copy(first, gallery / "twin.jpg")  # extracted once, both paths indexed
    groups = find_groups(_index_of(gallery, tmp_path, tiny_model), threshold, progress=False)
    if threshold == 1.0:
        assert [sorted(i.path for i in g.images) for g in groups] == [sorted([str(first), str(gallery / "twin.jpg")])]
    else:
        assert [len(g.images) for g in groups] == [13]  # every cosine is >= -1: one group of all


def _exact_components(vectors: np.ndarray, threshold: float) -> set[frozenset[int]]:
    """Connected components of "cosine >= threshold" by brute force (BFS over the full matrix)."""
    adjacent = vectors @ vectors.T >= threshold
    seen, out = set(), set()
    for start in range(len(vectors)):
        if start in seen:
            continue
        todo, comp = [start], {start}
        while todo:
            for j in np.flatnonzero(adjacent[todo.pop()]):
                if int(j) not in comp:
                    comp.add(int(j))
                    todo.append(int(j))
        seen |= comp
        if len(comp) > 1:
            out.add(frozenset(comp))
    return out


def _planted(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Clustered vectors in which 40 pictures get 1-4 noisy copies each (cosine ~0.97 to their original)."""
    rng = np.random.default_rng(seed)
    x = clustered_vectors(n, dim=64, clusters=30, seed=seed)
    slots = rng.permutation(n)
    for g in range(40):
        original = x[slots[5 * g]]
        for i in slots[5 * g + 1 : 5 * g + 2 + g % 4]:
            v = original + 0.25 * rng.normal(size=64).astype(np.float32) / 8
            x[i] = v / np.linalg.norm(v)
    return x


def test_whitened_recipes_have_their_own_threshold():
    """Whitening spreads the cosine scale: the whitened default is calibrated apart from the plain one."""
    plain = ModelInfo(name="m", weights_sha256="w" * 64, input_size=192, dim=1024, pooling=POOLINGS["rmac45"])
    whitened = dataclasses.replace(plain, whitening="PCA-whitening of each R-MAC region; sha256 " + "0" * 64)
    assert (duplicates.threshold_for(plain), duplicates.threshold_for(whitened)) == (0.86, 0.75)
    other = dataclasses.replace(whitened, pooling=POOLINGS["rmac"])  # not calibrated: the nearest whitened one
    assert duplicates.threshold_for(other) == duplicates.DEFAULT_WHITENED_THRESHOLD


def test_default_threshold_is_the_one_calibrated_for_the_index_recipe(tmp_path):
    vectors = _planted(600)
    for pooling, want in (("rmac45", 0.86), ("rmac", 0.80), ("max", duplicates.DEFAULT_THRESHOLD)):
        write_synthetic_shards(tmp_path / pooling / "f", vectors, shard_size=300, pooling=POOLINGS[pooling])
        build_index(tmp_path / pooling / "f", tmp_path / pooling / "i", progress=False)
        assert duplicates.default_threshold(Searcher(tmp_path / pooling / "i")) == want

    def groups(threshold):
        return [[i.path for i in g.images] for g in find_groups(tmp_path / "rmac45" / "i", threshold)]

    assert groups(None) == groups(0.86) != groups(0.80)
    features = tmp_path / "rmac45" / "f"
    features.rename(tmp_path / "aside")  # the recipe is in meta.json: the shards are not read
    assert duplicates.default_threshold(Searcher(tmp_path / "rmac45" / "i")) == 0.86
    (tmp_path / "aside").rename(features)
    meta_file = Searcher(tmp_path / "rmac45" / "i").version_dir / "meta.json"  # a version from before meta.json
    meta = json.loads(meta_file.read_text())  # kept the whole recipe: read from the shards of its features folder
    meta_file.write_text(json.dumps({**meta, "model": {k: meta["model"][k] for k in ("name", "checksum", "path")}}))
    assert duplicates.default_threshold(Searcher(tmp_path / "rmac45" / "i")) == 0.86
    for shard in (tmp_path / "rmac45" / "f").glob("shard-*.h5"):  # compacted since: other shard names, same recipe
        shard.rename(shard.with_name(shard.name.replace("shard-0", "shard-1")))
    assert duplicates.default_threshold(Searcher(tmp_path / "rmac45" / "i")) == 0.86
    shutil.rmtree(tmp_path / "rmac45" / "f")  # the recipe cannot be read: the uncalibrated default, not a failure
    assert duplicates.default_threshold(Searcher(tmp_path / "rmac45" / "i")) == duplicates.DEFAULT_THRESHOLD
    write_synthetic_shards(
        tmp_path / "rmac45" / "f",
        vectors,
        300,
        model_sha="e" * 64,  # another model's shards
        pooling=POOLINGS["rmac45"],
    )
    assert duplicates.default_threshold(Searcher(tmp_path / "rmac45" / "i")) == duplicates.DEFAULT_THRESHOLD


SLOW = pytest.mark.slow  # over ~3 s each (conftest.py: the quick loop leaves them out)


@pytest.mark.parametrize(
    "factory, small_blocks, rerank",
    [
        ("Flat", False, None),
        ("IVF64,Flat", False, None),
        ("IVF64,SQ8", False, 0),
        ("RR64,IVF64,SQ8", False, 0),
        pytest.param("PQ16x4", False, 0, marks=SLOW),
        ("Flat", True, None),
        ("IVF64,Flat", True, None),
        # compressed codes with a vector store (the default): the stored features are compared; fast-scan
        # codes cannot even be decoded from a file (faiss 1.15), so this is their only way
        ("IVF64,SQ8", False, None),
        pytest.param("IVF64,PQ16x4fs", False, None, marks=SLOW),
        pytest.param("IVF64,PQ16x4fs", True, None, marks=SLOW),
    ],
)
def test_groups_equal_exact_components_for_every_index_kind(tmp_path, monkeypatch, factory, small_blocks, rerank):
    # small blocks: many blocks, the vectors probing a list in many products, the probe table inverted in many passes
    if small_blocks:
        monkeypatch.setattr(pairs, "BLOCK_ROWS", 50)
        monkeypatch.setattr(pairs, "PROBE_ROWS", 70)
        monkeypatch.setattr(pairs, "PASS_PROBES", 5000)
    vectors = _planted().astype(np.float16).astype(np.float32)  # as the shards store them
    threshold = 0.9
    truth = _exact_components(vectors, threshold)
    assert len(truth) >= 30  # the planted groups, with the background's own close pairs if any
    write_synthetic_shards(tmp_path / "f", vectors, shard_size=700)
    build_index(
        tmp_path / "f",
        tmp_path / "i",
        factory=factory,
        nprobe=16 if "IVF" in factory else None,
        rerank=rerank,
        progress=False,
    )
    flags, read_index = [], faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, *flag: flags.append(flag) or read_index(path, *flag))
    groups = find_groups(tmp_path / "i", threshold, progress=False)
    assert flags == [(faiss.IO_FLAG_MMAP_IFC,)]  # the index was memory-mapped, not read into memory
    found = {frozenset(int(Path(i.path).stem) for i in g.images) for g in groups}
    assert found == truth
    sizes = [len(g.images) for g in groups]
    assert sizes == sorted(sizes, reverse=True) and [g.group for g in groups] == list(range(1, len(groups) + 1))
    first = groups[0]
    ids = [int(Path(i.path).stem) for i in first.images]
    # Compressed codes are re-ranked with the exact features: scores are exact for every kind (to float16's
    # precision where they come from the vector store).
    tol = 1e-4 if rerank == 0 or factory.endswith("Flat") else 2e-3
    assert [i.score_to_first for i in first.images] == pytest.approx(vectors[ids] @ vectors[ids[0]], abs=tol)
    assert all(i.width is None and i.bytes is None for i in first.images)  # made-up paths: no file facts


def test_each_vector_probes_the_lists_a_search_would(monkeypatch):
    """The probe table is the quantizer's own answer for every vector, in batches. (Guessed among the
    centroids nearest to the vector's own list's, it differed for 7% of these vectors and lost planted
    copy pairs at 1M.)"""
    monkeypatch.setattr(pairs, "PROBE_ROWS", 700)
    x = _planted()
    quantizer = faiss.IndexFlatIP(64)
    ivf = faiss.IndexIVFFlat(quantizer, 64, 64, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    slots, lists = duplicates.probe_table(ivf, lambda slots: x[slots], len(x), duplicates.Probing(3, 3))
    assert lists.dtype == np.int32 and (slots == np.repeat(np.arange(len(x)), 3)).all()
    assert (lists.reshape(-1, 3) == quantizer.search(x, 3)[1]).all()


def test_probing_by_gap_takes_every_list_nearly_as_near_as_the_nearest(monkeypatch):
    """With a gap, a vector probes its `least` nearest lists and every further one, up to `most`, whose
    centroid scores within the gap of its nearest: more lists for vectors between many centroids."""
    monkeypatch.setattr(pairs, "PROBE_ROWS", 700)
    x = _planted()
    quantizer = faiss.IndexFlatIP(64)
    ivf = faiss.IndexIVFFlat(quantizer, 64, 64, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    score, near = quantizer.search(x, 20)
    want = score[:, :1] - score <= 0.05
    want[:, :2] = True
    slots, lists = duplicates.probe_table(ivf, lambda slots: x[slots], len(x), duplicates.Probing(2, 20, 0.05))
    assert (slots == np.nonzero(want)[0]).all() and (lists == near[want]).all()
    per_vector = np.bincount(slots, minlength=len(x))
    assert per_vector.min() == 2 and per_vector.max() > per_vector.min()  # as many as each one needs
    probers = dict(duplicates.probers_by_list(slots, lists, ivf.nlist))  # inverted: ascending slots per list
    assert sum(map(len, probers.values())) == len(slots)
    assert all((np.diff(s) > 0).all() and (near[s] == m).any(axis=1).all() for m, s in probers.items())


@pytest.mark.parametrize("factory, rerank", [("IVF32,Flat", None), ("IVF32,SQ8", None), ("RR64,IVF32,SQ8", 0)])
@pytest.mark.slow
def test_ivf_pairs_are_those_either_vector_probes(tmp_path, monkeypatch, factory, rerank):
    """pairs_above's IVF contract, against brute force: every pair >= the cut in which either vector
    probes the other's list (its nprobe nearest centroids, by the quantizer), and no other."""
    monkeypatch.setattr(pairs, "PROBE_ROWS", 300)  # probes asked in batches, lists compared in several products
    write_synthetic_shards(tmp_path / "f", _planted(), shard_size=1000)
    build_index(tmp_path / "f", tmp_path / "i", factory=factory, nprobe=2, rerank=rerank, progress=False)
    searcher = Searcher(tmp_path / "i")
    ids, ivf = searcher.ids(), faiss.extract_index_ivf(searcher.index)
    x = searcher.vectors(ids) if rerank is None else searcher.decoded(ids)  # the vectors the index compares
    own = np.empty(len(ids), np.int64)
    for m in range(ivf.nlist):
        own[np.searchsorted(ids, faiss.rev_swig_ptr(ivf.invlists.get_ids(m), ivf.invlists.list_size(m)))] = m
    _, probes = ivf.quantizer.search(duplicates.pre_transform(searcher.index, x), 3)
    reach = (probes == own[:, None, None]).any(axis=2)  # reach[i, j]: own list of i is among those j probes
    i, j = np.nonzero(np.triu((x @ x.T >= 0.6) & (reach | reach.T), 1))
    assert len(i) > 1000 and (reach != reach.T).sum() > 1000  # many pairs, many reachable one way only
    batches = [
        np.stack([np.searchsorted(ids, a), np.searchsorted(ids, b)])
        for a, b, _ in pairs_above(searcher, ids, 0.6, duplicates.Probing(3, 3))
    ]
    got = np.sort(np.concatenate(batches, axis=1), axis=0)
    assert (got[0] != got[1]).all()
    assert {(a, b) for a, b in got.T.tolist()} == set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize(
    "factory, rerank", [("IVF32,Flat", None), ("IVF32,SQ8", 0), ("RR64,IVF32,SQ8", 0), ("RR64,IVF32,SQ8", None)]
)  # RR: probes in the rotated space
def test_ivf_with_few_probes_finds_parts_of_true_groups_and_the_planted_copies(tmp_path, factory, rerank):
    vectors = _planted()
    truth = _exact_components(vectors, 0.9)
    write_synthetic_shards(tmp_path / "f", vectors, shard_size=1000)
    build_index(tmp_path / "f", tmp_path / "i", factory=factory, nprobe=2, rerank=rerank, progress=False)
    groups = find_groups(tmp_path / "i", 0.9, nprobe=2, progress=False)
    found = {frozenset(int(Path(i.path).stem) for i in g.images) for g in groups}
    assert all(any(f <= t for t in truth) for f in found)  # never a pair below the threshold
    assert len(found & truth) >= 0.9 * len(truth)  # the close copies are in neighbouring lists


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_progress_bar_counts_every_image_once(tmp_path, capsys, factory):
    write_synthetic_shards(tmp_path / "f", _planted(600), shard_size=300)
    build_index(tmp_path / "f", tmp_path / "i", factory=factory, progress=False)
    capsys.readouterr()
    find_groups(tmp_path / "i", 0.9, progress=True)
    err = capsys.readouterr().err
    assert "duplicates" in err and "600/600" in err and "601/600" not in err


def test_compressed_index_whose_shards_are_gone_is_a_clear_error(tmp_path):
    write_synthetic_shards(tmp_path / "f", _planted(), shard_size=1000)
    build_index(tmp_path / "f", tmp_path / "i", factory="IVF16,SQ8", rerank=0, progress=False)
    shutil.rmtree(tmp_path / "f")
    with pytest.raises(PipelineError, match="rebuild the index"):
        find_groups(tmp_path / "i", 0.9, progress=False)


@pytest.mark.slow
def test_compressed_index_with_a_vector_store_needs_no_shards(tmp_path):
    vectors = _planted()
    write_synthetic_shards(tmp_path / "f", vectors, shard_size=1000)
    build_index(tmp_path / "f", tmp_path / "i", factory="IVF16,PQ16x4fs", nprobe=16, progress=False)
    shutil.rmtree(tmp_path / "f")
    found = {
        frozenset(int(Path(i.path).stem) for i in g.images) for g in find_groups(tmp_path / "i", 0.9, progress=False)
    }
    assert found == _exact_components(vectors, 0.9)


def test_union_find_matches_exact_components():
    rng = np.random.default_rng(3)
    n = 500
    a, b = rng.integers(0, n, 400), rng.integers(0, n, 400)
    a = np.concatenate([a, np.full(50, n - 1)])  # a star on the highest id: merged in a few rounds
    b = np.concatenate([b, np.arange(50)])
    parent = np.arange(n)
    union(parent, a, b)
    found_roots = roots(parent)
    adjacency = np.zeros((n, n), bool)
    adjacency[a, b] = adjacency[b, a] = True
    truth = _exact_components(adjacency.astype(np.float32) + np.eye(n, dtype=np.float32), 1.0)
    found = {}
    for i, r in enumerate(found_roots):
        found.setdefault(int(r), set()).add(i)
    assert {frozenset(c) for c in found.values() if len(c) > 1} == truth
    assert all(r == min(c) for r, c in found.items())  # the root is the group's smallest id


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_cli_json_text_sheets_and_nothing_touched(photos, tmp_path):
    index, root, copies = photos
    before = _tree(root), _tree(index)
    out = cli("duplicates", "--index", index, "--threshold", TINY_THRESHOLD, "--json", "--sheet", tmp_path / "sheets")
    groups = json.loads(out.stdout)
    assert [list(g) for g in groups] == [["group", "images"]]
    assert [set(i) for i in groups[0]["images"]] == [{"path", "score_to_first", "width", "height", "bytes"}] * 3
    assert [i["path"] for i in groups[0]["images"]] == [str(p) for p in copies]
    assert sorted(os.listdir(tmp_path / "sheets")) == ["group-0001.png"]
    with Image.open(tmp_path / "sheets" / "group-0001.png") as im:
        assert im.width > 3 * 160 and im.height > 160
    text = cli("duplicates", "--index", index, "--threshold", TINY_THRESHOLD).stdout.splitlines()
    assert text[0] == "group 1: 3 images"
    assert text[1].split() == ["1.0000", "192x144", str(copies[0].stat().st_size), str(copies[0])]
    assert (_tree(root), _tree(index)) == before  # nothing deleted, moved or rewritten, in the collection or the index


def test_min_size_and_limit(tmp_path):
    write_synthetic_shards(tmp_path / "f", _planted(), shard_size=1000)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    every = find_groups(tmp_path / "i", 0.9, progress=False)
    assert {len(g.images) for g in every} >= {2, 3, 4, 5}
    big = find_groups(tmp_path / "i", 0.9, min_size=4, progress=False)
    assert [g.images for g in big] == [g.images for g in every if len(g.images) >= 4]
    assert [g.to_dict() for g in find_groups(tmp_path / "i", 0.9, limit=2, progress=False)] == [
        g.to_dict() for g in every[:2]
    ]
    out = json.loads(
        cli("duplicates", "--index", tmp_path / "i", "--threshold", 0.9, "--min-size", 5, "--limit", 3, "--json").stdout
    )
    assert [len(g["images"]) for g in out] == [len(g.images) for g in every if len(g.images) >= 5][:3]


def test_cli_errors_and_help(tmp_path, photos):
    index, _, _ = photos
    assert "near-duplicate" in cli("duplicates", "--help").stdout
    r = cli("duplicates", "--index", index, "--threshold", 1.5, code=1)
    assert r.stderr.startswith("error: --threshold") and len(r.stderr.splitlines()) == 1
    assert "--min-size" in cli("duplicates", "--index", index, "--min-size", 1, code=1).stderr
    assert "--limit" in cli("duplicates", "--index", index, "--limit", 0, code=1).stderr
    assert "index folder not found" in cli("duplicates", "--index", tmp_path / "nope", code=1).stderr


def test_a_removed_image_is_in_no_group(photos, tmp_path, tiny_model):
    from pipeline.ingest import Collection
    from pipeline.model import read_model_info

    index, _, copies = photos
    info = read_model_info(tiny_model)
    with Collection(tmp_path, info.checksum, info.dim) as collection:  # (tmp_path/features holds the shards)
        collection.remove(str(copies[1]))
    groups = find_groups(index, TINY_THRESHOLD, progress=False)
    assert [i.path for i in groups[0].images] == [str(copies[0]), str(copies[2])]


def test_verified_groups_hold_a_crop_a_rotation_and_a_mirror_not_a_lookalike(tmp_path, tiny_model, caplog):
    pytest.importorskip("cv2", reason="the verify extra (opencv-python-headless) is not installed")
    from helpers import textured_picture

    root = tmp_path / "photos"
    root.mkdir()
    original = textured_picture(1)
    w, h = original.size
    original.save(root / "a.png")
    original.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).save(root / "a_crop.png")
    original.rotate(10, resample=Image.Resampling.BILINEAR, expand=True).save(root / "a_rot.png")
    original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "a_mirror.png")
    for seed in (2, 3):  # the same colours and style, other pictures
        textured_picture(seed).save(root / f"other{seed}.png")
    textured_picture(4).save(root / "gone.png")
    index = _index_of(root, tmp_path, tiny_model)
    (root / "gone.png").unlink()  # an indexed file that cannot be read now: its pairs are not checked
    groups = find_groups(index, progress=False, verify=True, workers=0)
    assert [sorted(Path(i.path).name for i in g.images) for g in groups] == [
        ["a.png", "a_crop.png", "a_mirror.png", "a_rot.png"]
    ]
    assert "not checked" in caplog.text
    out = cli("duplicates", "--index", index, "--verify", "--json", "--workers", "0")
    assert [len(g["images"]) for g in json.loads(out.stdout)] == [4]


def test_pairs_verified_in_worker_processes_get_the_verdicts_of_one_process(tmp_path, monkeypatch):
    pytest.importorskip("cv2", reason="the verify extra (opencv-python-headless) is not installed")
    from helpers import textured_picture
    from pipeline.duplicates import verified

    original = textured_picture(1)
    paths = []
    for name, im in [
        ("a.png", original),
        ("crop.png", original.crop((80, 60, 400, 300))),
        ("mirror.png", original.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ("other.png", textured_picture(2)),
    ]:
        im.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    paths.append(str(tmp_path / "missing.png"))
    a, b = np.array([0, 0, 0, 0, 1, 3]), np.array([1, 2, 3, 4, 2, 4])
    monkeypatch.setattr(verified, "CHUNK", 2)  # three chunks over two processes
    here = verified.verify_pairs(paths, a, b, progress=False, workers=0)
    there = verified.verify_pairs(paths, a, b, progress=False, workers=2)
    assert there == here
    assert [v.verified for v in here] == [True, True, False, False, True, False]
    assert here[3].reason and "file not found" in here[3].reason


def test_one_verified_pair_never_chains_two_groups():
    from pipeline.copies import Fit, Verdict
    from pipeline.duplicates import STRONG_INLIERS, VerifyReport, components
    from pipeline.duplicates.verified import join_verified

    parent = np.arange(6)
    a, b = np.array([0, 2, 1, 4, 0]), np.array([1, 3, 2, 5, 3])
    strong, weak = Verdict(True, Fit(STRONG_INLIERS)), Verdict(True, Fit(20))
    report = VerifyReport()
    join_verified(parent, a[:3], b[:3], [strong, strong, weak], report)  # {0,1} and {2,3}, one weak link
    assert [g.tolist() for g in components(parent, 2)] == [[0, 1], [2, 3]] and report.held_back == 1
    join_verified(parent, a, b, [strong, strong, weak, weak, weak], VerifyReport())  # a second link: joined
    assert [g.tolist() for g in components(parent, 2)] == [[0, 1, 2, 3], [4, 5]]
