"""Index build: the right index by size, measured recall, custom factories, safe publishing."""

from __future__ import annotations

import json
import threading

import faiss
import numpy as np
import pytest

from helpers import clustered_vectors, write_synthetic_shards
from pipeline.errors import ModelMismatchError, PipelineError
from pipeline.index import (
    CURRENT_FILE,
    HNSW_QUANTIZER_EF,
    VERSIONS_DIR,
    build_index,
    current_version,
    parse_size,
    plan_index,
    sample_runs,
)
from pipeline.search import Searcher


def test_plan_by_size():
    assert plan_index(500).factory == "Flat"
    big = plan_index(1_000_000)
    assert big.factory == "IVF4096,Flat" and 39 * 4096 <= big.train_size <= 256 * 4096
    assert plan_index(50_000).factory == "IVF1024,Flat"  # 4*sqrt(50k) = 894 -> 1024, 50k/39 = 1282
    assert plan_index(2000, flat_below=1000).nlist == 2000 // 39  # capped by the training rule
    with pytest.raises(PipelineError, match="needs at least"):
        plan_index(100, nlist=64)
    with pytest.raises(PipelineError, match="no features"):
        plan_index(0)


def test_max_memory_picks_compressed_codes():
    flat = plan_index(1_000_000, 512)
    assert flat.bytes_estimate == 1_000_000 * (2048 + 8) + 4096 * 512 * 4
    assert plan_index(1_000_000, 512, max_memory="1500M").factory == "IVF4096,SQ8"
    small = plan_index(1_000_000, 512, max_memory="100M")
    assert small.factory == "IVF1024,PQ128x4fs" and small.bytes_estimate <= 100 * 2**20
    assert "--max-memory" in small.reason and small.rerank == 500 and "re-ranked exactly" in small.reason
    assert plan_index(1_000_000, 512, max_memory="40M").factory == "IVF1024,PQ32x4fs"
    assert plan_index(1_000_000, 512, max_memory="100M", rerank=0).rerank == 0
    assert flat.rerank == 0 and plan_index(1_000_000, 512, factory="IVF1024,PQ32x4fs").rerank == 500
    with pytest.raises(PipelineError, match="do not fit"):
        plan_index(1_000_000, 512, max_memory="1M")
    # nlist and code size are asked of faiss, never parsed from the string by hand
    hnsw = plan_index(10_000_000, 512, factory="IVF65536_HNSW32,Flat")
    assert hnsw.nlist == 65536 and hnsw.bytes_estimate == 10_000_000 * (2048 + 8) + 65536 * 512 * 4
    assert plan_index(1_000_000, 512, factory="IVF1024,PQ32x4fs").bytes_estimate < 1_000_000 * 30
    # 10M in 4 GB: SQ8 (5.2 GB) does not fit; fast-scan PQ codes do, with an exact quantizer over
    # 4096 lists, the float16 store for re-ranking on disk and said to be outside the budget
    big = plan_index(10_000_000, 512, max_memory="4G")
    assert big.factory == "IVF4096,PQ256x4fs" and big.nlist == 4096 and big.bytes_estimate <= 4 * 2**30
    # an HNSW quantizer only where an exact one would cost too much per query
    assert plan_index(500_000_000, 512, max_memory="80G").factory.startswith("IVF32768_HNSW32,")
    assert big.rerank == 500 and "not resident" in big.reason and "9766 MiB" in big.reason
    assert plan_index(1_000_000, 512, factory="HNSW32").nlist == 0
    with pytest.raises(PipelineError, match="cannot build factory"):
        plan_index(1_000_000, 512, factory="IVF12,Nonsense")
    with pytest.raises(PipelineError, match="cannot read memory size"):
        parse_size("lots")
    assert parse_size("2G") == 2 * 2**30 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1000") == 1000


def test_small_collection_is_exact(tmp_path):
    vecs = clustered_vectors(300)
    paths = write_synthetic_shards(tmp_path / "f", vecs, 128)
    report = build_index(tmp_path / "f", tmp_path / "i", progress=False)
    assert report.meta["factory"] == "Flat" and report.meta["recall_at_10"] == 1.0
    assert "exact" in report.meta["reason"]
    hits = Searcher(tmp_path / "i").search_vectors(vecs[:5], k=3)
    assert [h[0].path for h in hits] == paths[:5]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-3)  # the shards store float16


def test_ivf_path_tunes_nprobe_for_recall(tmp_path):
    vecs = clustered_vectors(4000, clusters=50)
    write_synthetic_shards(tmp_path / "f", vecs, 1000)
    report = build_index(tmp_path / "f", tmp_path / "i", flat_below=1000, recall_queries=300, progress=False)
    m = report.meta
    assert m["factory"] == f"IVF{4000 // 39},Flat" and m["nlist"] == 4000 // 39
    assert m["recall_at_10"] >= 0.95 and m["nprobe"] >= 1 and m["recall_queries"] == 300
    sweep = m["nprobe_sweep"]
    assert sweep[-1]["nprobe"] == m["nprobe"] and sweep[-1]["recall_lower_bound"] >= 0.95
    assert all(s["recall_lower_bound"] < 0.95 for s in sweep[:-1])
    on_disk = json.loads((current_version(tmp_path / "i") / "meta.json").read_text())
    assert on_disk["nprobe"] == m["nprobe"] and on_disk["count"] == 4000
    assert [s["name"] for s in on_disk["shards"]] == [f"shard-0000{i}.h5" for i in range(4)]
    searcher = Searcher(tmp_path / "i")
    assert searcher.nprobe == m["nprobe"]
    like = searcher.search_like(["/synthetic/0000005.jpg"], k=3)[0].hits  # stored vector, memory-mapped IVF
    assert like[0].path == "/synthetic/0000005.jpg" and like[0].score == pytest.approx(1.0, abs=1e-3)
    others = searcher.search_like(["/synthetic/0000005.jpg"], k=3, exclude_self=True)[0].hits
    assert len(others) == 3 and "/synthetic/0000005.jpg" not in [h.path for h in others]
    assert faiss.extract_index_ivf(searcher.index).metric_type == faiss.METRIC_INNER_PRODUCT


def test_custom_factory(tmp_path):
    vecs = clustered_vectors(2000)
    paths = write_synthetic_shards(tmp_path / "f", vecs, 500)
    report = build_index(tmp_path / "f", tmp_path / "i", factory="IVF16,SQ8", progress=False)
    assert report.meta["factory"] == "IVF16,SQ8" and report.meta["nlist"] == 16
    hits = Searcher(tmp_path / "i").search_vectors(vecs[:20], k=1)
    assert np.mean([h[0].path == p for h, p in zip(hits, paths[:20], strict=True)]) >= 0.8  # SQ8 is lossy
    with pytest.raises(PipelineError, match="faiss cannot build factory"):
        build_index(tmp_path / "f", tmp_path / "j", factory="NotAFactory", progress=False)
    # an HNSW coarse quantizer is saved searching deeper than faiss's default efSearch (16)
    report = build_index(tmp_path / "f", tmp_path / "h", factory="IVF16_HNSW32,Flat", progress=False)
    searcher = Searcher(tmp_path / "h")  # owns the index the quantizer belongs to
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(searcher.index).quantizer)
    assert quantizer.hnsw.efSearch == HNSW_QUANTIZER_EF


def test_max_memory_build(tmp_path):
    vecs = clustered_vectors(2000)
    write_synthetic_shards(tmp_path / "f", vecs, 1000)
    report = build_index(tmp_path / "f", tmp_path / "i", flat_below=1000, max_memory=200_000, progress=False)
    assert report.meta["factory"] == "IVF51,SQ8" and report.meta["bytes_estimate"] <= 200_000
    assert report.meta["recall_at_10"] >= 0.8  # SQ8 codes, tuned nprobe


def test_compressed_index_reranks_to_the_exact_top_k(tmp_path):
    vecs = clustered_vectors(3000, clusters=30)
    paths = write_synthetic_shards(tmp_path / "f", vecs, 1000)
    # every vector a candidate: the re-ranked answer is the exact one (of the float16 features)
    report = build_index(
        tmp_path / "f",
        tmp_path / "i",
        factory="IVF16,PQ8x4fs",
        nprobe=16,
        rerank=3000,
        recall_queries=100,
        progress=False,
    )
    m = report.meta
    assert m["rerank"] == 3000 and m["recall_at_10"] >= 0.99  # against float32 truth: float16 near-ties
    searcher = Searcher(tmp_path / "i")
    assert searcher.store is not None and len(searcher.store) == 3000
    files = ("index.faiss", "vectors.npy", "vector_ids.npy")  # warm() reads the index and the whole store
    assert searcher.warm() == sum((searcher.version_dir / f).stat().st_size for f in files)
    stored = vecs.astype(np.float16).astype(np.float32)
    queries = clustered_vectors(20, clusters=30, seed=7)
    exact_scores, exact = faiss.knn(queries, stored, 10, metric=faiss.METRIC_INNER_PRODUCT)
    hits = searcher.search_vectors(queries, k=10)
    assert [[h.id for h in row] for row in hits] == exact.tolist()
    assert np.allclose([[h.score for h in row] for row in hits], exact_scores, atol=1e-5)
    # a compressed index alone misses some of them: the re-ranking is what makes them exact
    _, alone = searcher.index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=16))
    assert (alone != exact).any()
    # like=ID reads the stored vector (exact, not decoded PQ), exclude-self and min-score still hold
    assert np.allclose(searcher.vectors([5, 7]), stored[[5, 7]])
    with pytest.raises(PipelineError, match="cannot be decoded"):  # faiss would crash: a clear error instead
        searcher.decoded([5])
    like = searcher.search_like([paths[5]], k=3)[0].hits
    assert like[0].path == paths[5] and like[0].score == pytest.approx(float(stored[5] @ stored[5]), abs=1e-5)
    others = searcher.search_like([paths[5]], k=3, exclude_self=True)[0].hits
    assert len(others) == 3 and paths[5] not in [h.path for h in others]
    floor = float(exact_scores[0, 4])
    high = searcher.search_vectors(queries[:1], k=10, min_score=floor)[0]
    assert [h.id for h in high] == exact[0, :5].tolist()


@pytest.mark.slow
def test_compressed_build_tunes_the_reranked_path(tmp_path):
    vecs = clustered_vectors(4000, clusters=50)
    write_synthetic_shards(tmp_path / "f", vecs, 1000)
    report = build_index(
        tmp_path / "f", tmp_path / "i", flat_below=1000, max_memory=100_000, recall_queries=300, progress=False
    )
    m = report.meta
    assert "PQ" in m["factory"] and m["rerank"] == 500 and m["recall_at_10"] >= 0.95
    assert m["nprobe_sweep"][-1]["recall_lower_bound"] >= 0.95
    version = current_version(tmp_path / "i")
    assert (version / "vectors.npy").is_file() and (version / "vector_ids.npy").is_file()


def test_shards_of_two_models_are_refused(tmp_path):
    write_synthetic_shards(tmp_path / "f", clustered_vectors(10), 10)
    write_synthetic_shards(tmp_path / "g", clustered_vectors(10), 10, model_sha="a" * 64)
    (tmp_path / "g" / "shard-00000.h5").rename(tmp_path / "f" / "shard-00001.h5")
    with pytest.raises(ModelMismatchError, match="use a separate features folder per model"):
        build_index(tmp_path / "f", tmp_path / "i", progress=False)


def test_publishing_keeps_versions_and_old_readers(tmp_path):
    vecs = clustered_vectors(200)
    write_synthetic_shards(tmp_path / "f", vecs, 100)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    first = Searcher(tmp_path / "i")
    for _ in range(3):
        build_index(tmp_path / "f", tmp_path / "i", keep=2, progress=False)
    versions = sorted(p.name for p in (tmp_path / "i" / VERSIONS_DIR).iterdir())
    assert len(versions) == 2
    assert (tmp_path / "i" / CURRENT_FILE).read_text().strip() == versions[-1]
    assert first.search_vectors(vecs[:1], k=1)[0][0].path == "/synthetic/0000000.jpg"  # still answers


def test_readers_never_see_a_half_published_index(tmp_path):
    vecs = clustered_vectors(500)
    write_synthetic_shards(tmp_path / "f", vecs, 250)
    build_index(tmp_path / "f", tmp_path / "i", progress=False)
    stop = threading.Event()
    errors: list[Exception] = []
    opened = 0

    def reader():
        nonlocal opened
        while not stop.is_set():
            try:
                s = Searcher(tmp_path / "i")
                assert s.count == 500
                assert s.search_vectors(vecs[:1], k=1)[0][0].path == "/synthetic/0000000.jpg"
                opened += 1
            except Exception as exc:  # any failure is the finding
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(10):
            build_index(tmp_path / "f", tmp_path / "i", keep=1, progress=False)
    finally:
        stop.set()
        t.join()
    assert not errors and opened > 0


def test_recall_leaves_the_query_out():
    from pipeline.index import lower_bound, recall_at

    truth = np.array([[7, 1, 2, 3], [1, 2, 3, 4]])
    found = np.array([[7, 1, 2, 9], [9, 8, 3, 1]])
    per_query = recall_at(found, truth, np.array([7, 5]), k=3)
    np.testing.assert_allclose(per_query, [2 / 3, 2 / 3])  # query 7 is not its own neighbour
    assert lower_bound(np.array([1.0, 1.0, 1.0])) == 1.0
    assert lower_bound(np.array([0.9, 1.0] * 50)) < 0.95


def test_an_extract_during_the_build_is_wholly_in_or_out(tmp_path, tiny_model, monkeypatch):
    """build-index does not wait for extract; an extract that records a shard while the build is
    reading (run here at a fixed point of the build, the moment it starts reading shard headers)
    must not give an index whose digest counts images it lacks: the next rebuild would call that
    index up to date."""
    from helpers import save_pattern
    from pipeline.extract import extract
    from pipeline.features import folder
    from pipeline.rebuild import rebuild

    root, work = tmp_path / "photos", tmp_path / "work"
    for i in range(4):
        save_pattern(root / f"{i}.png", i)
    extract([root], work / "features", tiny_model, workers=0, progress=False)
    real_shard_info = folder.shard_info
    interleaved = []

    def shard_info_while_extract_runs(path):
        if not interleaved:
            for i in range(4, 7):
                save_pattern(root / f"{i}.png", i)
            interleaved.append(extract([root], work / "features", tiny_model, workers=0, progress=False))
        return real_shard_info(path)

    monkeypatch.setattr(folder, "shard_info", shard_info_while_extract_runs)  # where live_parts reads headers
    built = build_index(work / "features", work / "index")
    assert interleaved[0].extracted == 3  # the extract did run in the middle of the build
    monkeypatch.undo()
    report = rebuild([root], work, tiny_model, workers=0)
    assert report.index_built and report.index_meta["count"] == 7, built.meta["count"]


def test_training_sample_is_read_in_few_runs():
    rng = np.random.default_rng(0)
    for n, size in ((10_000_000, 262_144), (1_000_000, 262_144), (50_000, 3_000), (1_000, 5_000)):
        sample = sample_runs(rng, n, size, reads=4096)
        assert len(sample) == min(n, size) and (np.diff(sample) > 0).all() and sample[-1] < n
        assert (np.diff(sample) != 1).sum() + 1 <= 4096  # reads: runs of consecutive positions
    spread = sample_runs(rng, 10_000_000, 262_144, reads=4096)
    assert np.histogram(spread, bins=10, range=(0, 10_000_000))[0].min() > 0.08 * 262_144  # the whole collection
