"""The query service (`pipeline serve`): API in-process, limits, micro-batching, hot swaps under load."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
import httpx
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from helpers import (
    centre_crop,
    live_server,
    save_pattern,
    serve_child,
    tiny_layers,
    wait_for,
    write_bad_corpus,
    write_tiny_model,
)
from pipeline.cli import app as cli_app
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.index import build_index
from pipeline.model import build_feature_graph, save_model
from pipeline.rebuild import rebuild
from pipeline.search import Searcher
from pipeline.serve import Service, create_app

LOCAL = "http://127.0.0.1"  # a loopback Host: what the service answers by default


@pytest.fixture()
def index_dir(tmp_path, gallery, tiny_model) -> Path:
    rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)
    return tmp_path / "work" / "index"


@pytest.fixture()
def service(index_dir, tiny_model):
    return Service(index_dir, tiny_model, poll=0)


@pytest.fixture()
def client(service):
    with TestClient(create_app(service), base_url=LOCAL) as c:
        yield c


def upload(*files: tuple[str, bytes]) -> list:
    return [("image", (name, data, "application/octet-stream")) for name, data in files]


def block_model(service: Service):
    """Make the model wait for `release` (returned with `entered`, set once a batch is in the model)."""
    entered, release = threading.Event(), threading.Event()
    embed = service.model.embed

    def blocked(images: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait()
        return embed(images)

    service.model.embed = blocked
    return entered, release


def test_upload_answers_like_the_cli_plus_id_and_thumbnail(client, index_dir, gallery, tiny_model, tmp_path):
    original = sorted(gallery.rglob("img03.*"))[0]
    crop = centre_crop(original, tmp_path / "crop.png")
    r = client.post("/api/search?k=5", files=upload(("crop.png", crop.read_bytes())))
    assert r.status_code == 200, r.text
    [got] = r.json()
    assert got["query"] == "crop.png" and got["results"][0]["path"] == str(original)
    cli = Searcher(index_dir, model=tiny_model).search([crop], k=5)[0].to_dict()
    version = r.headers["X-Index-Version"]
    assert [{k: v for k, v in h.items() if k != "thumbnail"} for h in got["results"]] == cli["results"]
    assert all(h["thumbnail"] == f"/api/thumbnail/{h['id']}?version={version}" for h in got["results"])
    assert set(got["results"][0]) == {"rank", "id", "path", "score", "metadata", "thumbnail"}

    # Several images in one request; one that cannot be used gets its reason, the others answer.
    r = client.post(
        "/api/search?k=2&exclude_self=true",
        files=upload(("a.png", original.read_bytes()), ("junk.jpg", b"not an image at all")),
    )
    assert r.status_code == 200
    a, junk = r.json()
    assert str(original) not in [h["path"] for h in a["results"]] and len(a["results"]) == 2  # exclude_self: same bytes
    assert "not an image" in junk["error"] and junk["results"] == []


def test_an_aspect_kept_model_serves_uploads_of_every_shape(tmp_path):
    """Uploads are resized to the index's model's buckets and batched per shape, like extraction."""
    model, _ = build_feature_graph(tiny_layers(0), input_size=64, pooling="rmac", aspect=True)
    save_model(model, tmp_path / "aspect.onnx")
    files = [
        save_pattern(tmp_path / "imgs" / f"p{i}.png", i, size)
        for i, size in enumerate([(96, 72), (72, 128), (80, 80), (96, 64)])
    ]  # width x height
    rebuild([tmp_path / "imgs"], tmp_path / "work", tmp_path / "aspect.onnx", workers=0, progress=False)
    with TestClient(
        create_app(Service(tmp_path / "work" / "index", tmp_path / "aspect.onnx", poll=0)), base_url=LOCAL
    ) as c:
        r = c.post("/api/search?k=1", files=upload(*[(f.name, f.read_bytes()) for f in files]))
    assert r.status_code == 200, r.text
    assert [got["results"][0]["path"] for got in r.json()] == [str(f) for f in files]
    assert all(got["results"][0]["score"] == pytest.approx(1.0, abs=1e-3) for got in r.json())


def test_more_like_this_by_id(client, gallery):
    first = client.get("/api/search?like=0&k=3").json()[0]
    assert first["results"][0]["id"] == 0 and first["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    mlt = client.get("/api/search", params={"like": 0, "k": 3, "exclude_self": True}).json()[0]
    assert first["query"] == mlt["query"] and 0 not in [h["id"] for h in mlt["results"]]
    assert client.get("/api/search?like=12345").status_code == 404
    assert client.get("/api/search?like=0&version=v1999").json() == {
        "error": "index version v1999 is no longer served; search again"
    }
    bad = client.get("/api/search?like=0&k=0")
    assert bad.status_code == 422 and bad.json() == {"error": "k: Input should be greater than or equal to 1"}


def test_thumbnails_by_id_only_cached_and_no_path_ever_read(client, service, tmp_path):
    r = client.get("/api/thumbnail/4")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 320
    Path(service.searcher.path_of(4)).unlink()
    assert client.get("/api/thumbnail/4").content == r.content  # cached: the file is no longer needed
    assert client.get("/api/thumbnail/5?version=nope").status_code == 410

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    attempts = [
        f"/api/thumbnail/{secret}",
        "/api/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/thumbnail/-1",
        f"/api/search?like={secret}",
        "/api/search?like=../../etc/passwd",
        "/static/../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2Fapp.py",
        f"/static/{secret}",
        f"/{secret}",
        "/api/thumbnail/99999999999999999999",
    ]
    for url in attempts:
        r = client.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert "TOP-SECRET" not in r.text and "root:" not in r.text and "import" not in r.text, url
        assert "error" in r.json(), url


def test_bad_uploads_get_their_4xx_and_never_disturb_a_good_one(service, gallery, tmp_path):
    good, bad = write_bad_corpus(tmp_path / "bad")
    query = sorted(gallery.rglob("img05.*"))[0]
    with TestClient(create_app(service, max_upload=2_000_000), base_url=LOCAL) as client:
        names = ("zero.jpg", "truncated.jpg", "text.jpg", "bomb.png")
        cases = {name: (tmp_path / "bad" / name).read_bytes() for name in names}
        for name, data in cases.items():
            r = client.post("/api/search", files=upload((name, data)))
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"].startswith(f"{name}: ") and bad[name] in r.json()["error"]
            ok = client.post("/api/search?k=1", files=upload(("q", query.read_bytes())))
            assert ok.status_code == 200 and ok.json()[0]["results"][0]["path"] == str(query)
        big = upload(("big.jpg", b"\xff" * 3_000_000))
        r = client.post("/api/search", files=big)
        assert r.status_code == 413 and "too large" in r.json()["error"]
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        r = client.post(
            "/api/search",
            content=iter([head] + [b"x" * 1_000_000] * 3),  # chunked: no Content-Length
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413, r.text
        assert client.post("/api/search").json() == {"error": "image: Field required"}
        assert client.post("/api/search", files=upload(*[("q", b"x")] * 33)).status_code == 400
        assert client.get("/api/stats").json()["requests_served"] == len(cases)


def test_concurrent_queries_share_one_model_batch_and_a_full_queue_answers_503(index_dir, tiny_model, gallery):
    service = Service(index_dir, tiny_model, poll=0, queue_size=4, batch_size=8, max_wait_ms=0)
    query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
    with TestClient(create_app(service), base_url=LOCAL) as client:
        entered, release = block_model(service)
        pixels, _ = service.decode(query)
        first = service.batcher.submit(pixels)  # a lone query goes to the model at once
        wait_for(entered.is_set, "the first batch to reach the model")
        waiting = [service.batcher.submit(pixels) for _ in range(4)]  # the queue is now full
        r = client.post("/api/search", files=upload(("q", query)))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]
        batches = service.batcher.batches
        release.set()
        feats = [f.result() for f in [first, *waiting]]
        assert service.batcher.batches == batches + 2 and service.batcher.images == 5
        np.testing.assert_allclose(feats[1], feats[0], atol=1e-6)
        assert client.post("/api/search", files=upload(("q", query))).status_code == 200


def test_a_request_that_waits_too_long_is_answered_503(index_dir, tiny_model, gallery):
    service = Service(index_dir, tiny_model, poll=0, timeout=0.2)
    with TestClient(create_app(service), base_url=LOCAL) as client:
        entered, release = block_model(service)
        r = client.post("/api/search", files=upload(("q", sorted(gallery.rglob("*.jpg"))[0].read_bytes())))
        release.set()
        assert r.status_code == 503 and "no answer within 0.2 s" in r.json()["error"]


def test_api_key(service):
    with TestClient(create_app(service, api_key="s3cret"), base_url=LOCAL) as client:
        for url in ("/api/stats", "/api/search?like=0", "/api/thumbnail/0"):
            assert client.get(url).status_code == 401, url
            assert client.get(url, headers={"X-API-Key": "wrong"}).status_code == 401, url
            assert client.get(url, headers={"X-API-Key": "s3cret"}).status_code == 200, url
        assert client.get("/api/stats").json()["error"].startswith("missing or wrong API key")
        client.cookies.set("pipeline_session", "s3cret")  # the key itself is not a session
        assert client.get("/api/thumbnail/0").status_code == 401
        client.cookies.clear()
        assert client.post("/api/session", headers={"X-API-Key": "wrong"}).status_code == 401
        r = client.post("/api/session", headers={"X-API-Key": "s3cret"})  # what the page does with the key
        cookie = r.headers["set-cookie"]
        assert r.status_code == 204 and "HttpOnly" in cookie and "SameSite=strict" in cookie and "s3cret" not in cookie
        assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
        assert client.get("/api/thumbnail/0").status_code == 200  # <img> requests carry the cookie
        client.cookies.clear()
        assert client.get("/api/health").json()["status"] == "ready"  # for monitors: reveals nothing
        assert client.get("/").status_code == 200 and client.get("/openapi.json").status_code == 200
    with TestClient(create_app(service, api_key="s3cret"), base_url="https://127.0.0.1") as client:
        assert "Secure" in client.post("/api/session", headers={"X-API-Key": "s3cret"}).headers["set-cookie"]


def test_key_host_and_size_are_checked_before_the_body_is_read(service, gallery):
    """A refused request's body is never read: the app sees no request at all."""
    reads = []
    app = create_app(service, api_key="s3cret", max_upload=1000)

    class Spy:  # between the Gate and the app: what the Gate lets through
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            async def spied():
                message = await receive()
                reads.append(len(message.get("body", b"")))
                return message

            await self.inner(scope, spied if scope["type"] == "http" else receive, send)

    app.add_middleware(Spy)
    app.user_middleware.reverse()  # the Gate outermost, the spy inside it
    body = upload(("q", b"x" * 500))
    with TestClient(app, base_url=LOCAL) as client:
        assert client.post("/api/search", files=body).status_code == 401  # no key
        assert client.post("/api/search", files=upload(("q", b"x" * 5000))).status_code == 401
        r = client.post("/api/search", files=body, headers={"X-API-Key": "s3cret", "host": "evil.example:8000"})
        assert r.status_code == 421 and "evil.example" in r.json()["error"]  # DNS rebinding
        big = upload(("q", b"x" * 5000))
        assert client.post("/api/search", files=big, headers={"X-API-Key": "s3cret"}).status_code == 413
        assert reads == []
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            r = client.get("/api/health", headers={"host": host})
            assert r.status_code == 200, host
    with TestClient(create_app(service, allowed_hosts=None), base_url="http://photos.example") as client:
        assert client.get("/api/health").status_code == 200  # allowed_hosts=None: any name


def test_security_headers_on_every_answer(client):
    for url in ("/", "/static/app.js", "/api/stats", "/api/health", "/api/thumbnail/0", "/api/nothing"):
        r = client.get(url)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, url
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", url
    assert client.get("/api/stats").headers["cache-control"] == "no-store"
    assert client.get("/api/thumbnail/0").headers["cache-control"].startswith("private")


def test_api_key_file(tmp_path, index_dir, tiny_model, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    (tmp_path / "key").write_text("from-a-file\n")
    base = ["serve", "--index", str(index_dir), "--model", str(tiny_model), "--no-warm"]
    runner = CliRunner()
    result = runner.invoke(cli_app, [*base, "--api-key-file", str(tmp_path / "key"), "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    with TestClient(seen["app"], base_url="http://photos.example") as client:  # any Host when not on loopback
        assert client.get("/api/stats").status_code == 401
        assert client.get("/api/stats", headers={"X-API-Key": "from-a-file"}).status_code == 200
    (tmp_path / "empty").write_text("")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        result = runner.invoke(cli_app, [*base, "--api-key-file", str(bad)])
        assert result.exit_code == 1 and result.stderr.startswith("error: ") and str(bad) in result.stderr


def test_health_stats_page_and_schema(client):
    assert client.get("/api/health").json()["status"] == "ready"
    stats = client.get("/api/stats").json()
    assert stats["count"] == 12 and stats["model"]["name"] == "tiny-vgg" and stats["version"].startswith("v")
    assert {"built_at", "nprobe", "requests_served", "latency_ms"} <= set(stats)
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/thumbnail/{idx}", "/api/health", "/api/stats"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # its UI would load from a CDN


def add_images(gallery: Path, seeds: range) -> list[Path]:
    return [save_pattern(gallery / "new" / f"new{s}.png", seed=s) for s in seeds]


def test_in_flight_request_finishes_on_the_old_version(client, service, gallery, tiny_model, tmp_path):
    old = service.searcher.version_dir.name
    entered, release = block_model(service)
    query = add_images(tmp_path / "q", range(500, 501))[0].read_bytes()
    answers = []
    in_flight = threading.Thread(
        target=lambda: answers.append(client.post("/api/search?k=20", files=upload(("q", query))))
    )
    in_flight.start()
    wait_for(entered.is_set, "the request to reach the model")
    new_image = add_images(gallery, range(500, 501))[0]
    rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)
    assert service.refresh()
    release.set()
    in_flight.join()
    assert answers[0].status_code == 200 and answers[0].headers["X-Index-Version"] == old
    assert str(new_image) not in [h["path"] for h in answers[0].json()[0]["results"]]
    r = client.post("/api/search?k=1", files=upload(("q", query)))
    assert r.headers["X-Index-Version"] != old and r.json()[0]["results"][0]["path"] == str(new_image)
    thumb = answers[0].json()[0]["results"][0]["thumbnail"]  # an id of the old version still resolves there
    assert old in thumb and client.get(thumb).status_code == 200


def test_a_version_made_by_another_model_is_refused(client, service, gallery, tmp_path, caplog):
    old = service.searcher.version_dir.name
    other = write_tiny_model(tmp_path / "other.onnx", seed=1, name="other-vgg")
    extract([gallery], tmp_path / "other-features", other, workers=0, progress=False)
    build_index(tmp_path / "other-features", service.index_dir, progress=False)
    with caplog.at_level(logging.ERROR, logger="pipeline.serve"):
        assert not service.refresh()
        assert not service.refresh()  # logged once, not on every poll
    logged = [r.message for r in caplog.records if r.name.startswith("pipeline.serve")]
    new = (service.index_dir / "CURRENT").read_text().strip()
    assert len(logged) == 1 and logged[0].startswith(f"refused index version {new}: made by model other-vgg")
    assert f"still serving {old}" in logged[0]
    stats = client.get("/api/stats").json()
    assert stats["version"] == old and stats["published"] == new and not stats["serving_published"]
    assert stats["refused"]["version"] == new and "other-vgg" in stats["refused"]["reason"]
    health = client.get("/api/health")
    assert health.status_code == 200 and health.json()["refused"] == stats["refused"]  # still serving: ready
    assert client.get("/api/search?like=0").status_code == 200


def publish(name: str, index_dir: Path) -> None:
    """What an operator's rollback does: CURRENT names another version."""
    (index_dir / "CURRENT.tmp").write_text(name + "\n")
    (index_dir / "CURRENT.tmp").replace(index_dir / "CURRENT")


@pytest.mark.parametrize("keep", [3, 1])  # 3: the old version is still held; 1: it is opened again from disk
def test_rollback_by_current_takes_effect_without_restart(index_dir, tiny_model, gallery, tmp_path, keep):
    service = Service(index_dir, tiny_model, poll=0, keep=keep).start()
    try:
        old = service.searcher.version_dir.name
        add_images(gallery, range(600, 602))
        rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)
        assert service.refresh() and service.searcher.version_dir.name != old
        new = service.searcher.version_dir.name
        publish(old, index_dir)
        assert service.refresh() and service.searcher.version_dir.name == old and service.searcher.count == 12
        assert service.health()["serving_published"] and service.health()["refused"] is None
        publish(new, index_dir)
        assert service.refresh() and service.searcher.count == 14
    finally:
        service.close()


def test_a_version_that_fails_to_open_is_tried_again_with_back_off(
    index_dir, tiny_model, gallery, tmp_path, monkeypatch
):
    from pipeline.serve import service as service_module

    service = Service(index_dir, tiny_model, poll=0).start()  # no watcher; back-off of 0 * 2**attempts s
    try:
        add_images(gallery, range(700, 701))
        rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)
        opened = service_module.Searcher
        failures = iter([True, True])

        def flaky(*args, **kwargs):
            if next(failures, False):
                raise PipelineError("cannot open index.faiss (Too many open files)")
            return opened(*args, **kwargs)

        monkeypatch.setattr(service_module, "Searcher", flaky)
        assert not service.refresh()
        refused = service.health()["refused"]
        assert refused["attempts"] == 1 and "Too many open files" in refused["reason"]
        assert not service.refresh() and service.health()["refused"]["attempts"] == 2
        assert service.refresh()  # a transient failure heals
        assert service.searcher.count == 13 and service.health()["refused"] is None
    finally:
        service.close()


def test_a_replaced_model_file_is_reported_and_a_restart_refuses_it_with_exit_78(index_dir, tiny_model, tmp_path):
    import shutil

    import uvicorn

    model = Path(shutil.copy(tiny_model, tmp_path / "model.onnx"))
    service = Service(index_dir, model, poll=0).start()
    try:
        assert not service.health()["model_file_changed"]
        write_tiny_model(tmp_path / "other.onnx", seed=1, name="other-vgg").replace(model)
        service.refresh()
        assert service.health()["model_file_changed"]
    finally:
        service.close()
    runner = CliRunner()
    started = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(uvicorn, "run", lambda *a, **kw: started.append(a))
        result = runner.invoke(cli_app, ["serve", "--index", str(index_dir), "--model", str(model), "--no-warm"])
    assert result.exit_code == 78 and not started
    assert result.stderr.startswith("error: the index was built with model") and "\n" not in result.stderr.strip()


def test_hot_swaps_under_concurrent_load_fail_no_request(index_dir, tiny_model, gallery, tmp_path):
    """Four clients query without pause while three rebuilds publish; every new image becomes findable."""
    service = Service(index_dir, tiny_model, poll=0.05)
    queries = [p.read_bytes() for p in sorted(gallery.rglob("*.jpg"))[:4]]
    statuses: list[int] = []
    stop = threading.Event()
    with live_server(create_app(service)) as url:

        def load(data: bytes) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                for _ in range(2000):  # bounded; stopped long before
                    if stop.is_set():
                        return
                    statuses.append(http.post("/api/search?k=3", files=upload(("q", data))).status_code)

        clients = [threading.Thread(target=load, args=(q,)) for q in queries]
        for c in clients:
            c.start()
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                for round_ in range(3):
                    new = add_images(gallery, range(600 + 2 * round_, 602 + 2 * round_))
                    rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False)

                    def found(new: list[Path] = new) -> bool:  # this round's images
                        r = http.post("/api/search?k=1", files=upload(("q", new[-1].read_bytes())))
                        return r.json()[0]["results"][0]["path"] == str(new[-1])

                    wait_for(found, f"round {round_}'s new images to be served")
        finally:
            stop.set()
            for c in clients:
                c.join()
        versions = httpx.get(f"{url}/api/stats").json()
    assert len(statuses) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert versions["count"] == 12 + 6


def test_cli_serve_help_and_refusals(index_dir, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli_app, ["serve", "--help"])
    assert out.exit_code == 0 and "--api-key" in out.stdout and "--index" in out.stdout
    r = runner.invoke(cli_app, ["serve", "--index", str(index_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "give --api-key" in r.stderr
    r = runner.invoke(cli_app, ["serve", "--index", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.stderr.startswith("error: index folder not found")


def test_metrics_count_requests_batches_and_the_version_served(service, gallery):
    from prometheus_client.parser import text_string_to_metric_families

    query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
    with TestClient(create_app(service, api_key="s3cret"), base_url=LOCAL) as client:
        key = {"X-API-Key": "s3cret"}
        assert client.post("/api/search", files=upload(("q", query)), headers=key).status_code == 200
        assert client.post("/api/search", files=upload(("q", query))).status_code == 401  # refused unread: counted
        assert client.get("/api/thumbnail/0", headers=key).status_code == 200
        assert client.get("/api/thumbnail/99999", headers=key).status_code == 404
        r = client.get("/metrics")  # no key: counts and version names only, for a scraper
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("pipeline_http_requests_total", route="/api/search", status="200") == 1
    assert value("pipeline_http_requests_total", route="/api/search", status="401") == 1
    assert value("pipeline_http_requests_total", route="/api/thumbnail", status="404") == 1  # ids are no labels
    assert value("pipeline_http_request_duration_seconds_count", route="/api/search") == 2
    assert value("pipeline_model_batch_size_count") == value("pipeline_model_images_total") >= 1
    assert value("pipeline_model_queue_images") == 0 and value("pipeline_model_queue_capacity") == 64
    version = service.searcher.version_dir.name
    assert value("pipeline_index_version_info", served=version, published=version) == 1
    assert value("pipeline_index_images") == 12 and value("pipeline_index_serving_published") == 1
    assert 0 <= value("pipeline_index_version_age_seconds") < 3600 and value("pipeline_up") == 1


def raw_request(url: str, head: bytes, body: bytes = b"", wait: float = 10.0, refused: bool = False) -> bytes:
    """Send a request's head and the start of its body over a plain socket, then read what comes back.
    `refused`: a request the service answers from its head: the answer is read first, then the body is offered
    (a server that closes with bytes unread resets the connection, which could drop its answer in flight)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head if refused else head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        if refused:
            try:
                sock.sendall(body)
            except OSError:  # closed: the service did not want it
                pass
        return answer


def test_a_slow_body_is_cut_off_and_a_no_key_flood_holds_nothing(service, gallery):
    query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
    app = create_app(service, api_key="s3cret", body_timeout=0.5)
    with live_server(app) as url:
        host = url.removeprefix("http://").encode()
        # Slowloris: the head and 10 bytes of a declared 100,000, then nothing: 408 once the time is up.
        head = (
            b"POST /api/search HTTP/1.1\r\nHost: " + host + b"\r\nX-API-Key: s3cret\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        )
        answer = raw_request(url, head, b"--b\r\nxxxxx")
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
        # A flood without the key: each answered 401 from its head, its body never read or kept.
        fds = len(os.listdir("/proc/self/fd"))
        flood = head.replace(b"X-API-Key: s3cret\r\n", b"").replace(b"100000", b"10000000")
        for _ in range(200):
            assert raw_request(url, flood, b"x" * 65536, refused=True).startswith(b"HTTP/1.1 401")
        wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2, "the flood's sockets to be closed")
        r = httpx.post(f"{url}/api/search?k=1", files=upload(("q", query)), headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200  # the service still answers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB, and the open descriptors, of a process (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "peak_kib": int(fields["VmHWM"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def test_sigterm_finishes_the_request_in_flight_then_exits_0(index_dir, tiny_model, gallery):
    with serve_child(index_dir, tiny_model, "--timeout", "20") as (child, url):
        port = int(url.rsplit(":", 1)[1])
        query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
        body = b"--b\r\nContent-Disposition: form-data; name=image; filename=q.jpg\r\n\r\n" + query + b"\r\n--b--\r\n"
        head = (
            f"POST /api/search?k=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body[:100])  # a request in flight: half its body sent
            child.send_signal(signal.SIGTERM)

            def refusing() -> bool:  # shutting down: no new connections
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return False
                except OSError:
                    return True

            wait_for(refusing, "the service to stop listening")
            assert child.poll() is None  # still finishing the request in flight
            sock.sendall(body[100:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"results"' in answer
        assert child.wait(timeout=30) == 0


def test_a_stop_ends_reading_a_version_into_the_page_cache(index_dir):
    stop = threading.Event()
    assert Searcher(index_dir).warm(stop) > 0
    stop.set()  # what Service.close() does: a shutdown does not wait for 10 GB to be read
    assert Searcher(index_dir).warm(stop) == 0


def test_thumbnails_read_only_regular_files_never_a_link_or_a_fifo(client, service, tmp_path, monkeypatch):
    from pipeline.serve import thumbnails

    paths = {i: service.searcher.path_of(i) for i in range(3)}
    outside = save_pattern(tmp_path / "private" / "secret.png", seed=99)
    os.unlink(paths[0])
    os.symlink(outside, paths[0])  # swapped for a link to a file outside the collection
    os.unlink(paths[1])
    os.mkfifo(paths[1])  # a FIFO: opening it for reading would block for ever
    r = client.get("/api/thumbnail/0")
    assert r.status_code == 404 and "a symbolic link" in r.json()["error"]
    r = client.get("/api/thumbnail/1")
    assert r.status_code == 404 and "not a regular file" in r.json()["error"]
    monkeypatch.setattr(thumbnails, "THUMB_MAX_BYTES", 100)
    r = client.get("/api/thumbnail/2")
    assert r.status_code == 404 and "over the 100 read here" in r.json()["error"]


def test_hung_thumbnail_reads_answer_busy_and_never_stop_searches(client, service, gallery, monkeypatch):
    from pipeline.serve import thumbnails

    release, entered = threading.Event(), []

    def hung(idx: int, path: str, roots: object = None) -> bytes:  # a read from a stale network mount
        entered.append(idx)
        release.wait()
        return b""

    monkeypatch.setattr(thumbnails, "render_thumbnail", hung)
    monkeypatch.setattr(thumbnails, "THUMB_TIMEOUT", 0.2)
    try:
        for i in range(thumbnails.THUMB_WORKERS):
            r = client.get(f"/api/thumbnail/{i}")
            assert r.status_code == 503 and "did not read within 0.2 s" in r.json()["error"]
        health = client.get("/api/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["saturated"] == ["thumbnails"]
        r = client.get("/api/thumbnail/9")  # every reader held: busy at once, no thread started
        assert r.status_code == 503 and "thumbnails are busy" in r.json()["error"] and 9 not in entered
        query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
        assert client.post("/api/search?k=1", files=upload(("q", query))).status_code == 200
        assert client.get("/api/search?like=3").status_code == 200
    finally:
        release.set()
    wait_for(lambda: client.get("/api/health").json()["status"] == "ready", "the hung reads to return")


def test_thumbnails_read_only_inside_the_folders_the_collection_was_scanned_from(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i in range(4):
        save_pattern(photos / ("inner" if i % 2 else "outer") / f"p{i}.png", seed=i)
    elsewhere = tmp_path / "mnt" / "disk"
    elsewhere.parent.mkdir()
    os.rename(photos, elsewhere)
    os.symlink(elsewhere, photos)  # the collection's root is itself a link (a mounted disk): that is fine
    rebuild([photos], tmp_path / "work", tiny_model, workers=0, progress=False)
    service = Service(tmp_path / "work" / "index", tiny_model, poll=0)
    assert service.start().searcher.roots == [str(photos)]
    with TestClient(create_app(service), base_url=LOCAL) as client:
        ids = {Path(service.searcher.path_of(i)).name: i for i in range(4)}
        assert client.get(f"/api/thumbnail/{ids['p0.png']}").status_code == 200
        private = save_pattern(tmp_path / "private" / "p1.png", seed=99).parent
        inner = elsewhere / "inner"
        os.rename(inner, tmp_path / "old-inner")
        os.symlink(private, inner)  # a folder inside the collection swapped for a link to one outside it
        r = client.get(f"/api/thumbnail/{ids['p1.png']}")
        assert r.status_code == 404 and "outside the collection's folders" in r.json()["error"]


def test_a_request_past_its_deadline_stops_its_work_at_the_next_stage(service, gallery, monkeypatch):
    from pipeline.errors import DeadlineExceeded
    from pipeline.serve import service as service_module

    searcher = service.start().searcher
    vector = searcher.vectors([searcher.ids()[0]])
    with pytest.raises(DeadlineExceeded, match="before the index search"):
        searcher.search_vectors(vector, 3, deadline=time.monotonic() - 1)
    service.timeout = 0.3
    decoded, looked_up = [], []
    monkeypatch.setattr(service_module, "decode_bytes", lambda *a: decoded.append(a))
    monkeypatch.setattr(searcher, "rows", lambda ids: looked_up.append(ids))
    query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
    with TestClient(create_app(service), base_url=LOCAL) as client:
        # Decoding waits for room in the budget, past the request's time: answered 503, and never decoded.
        room, release = threading.Event(), threading.Event()

        def hold_the_budget() -> None:
            with service.decode_budget.take(service.decode_budget.total, 1):
                room.set()
                release.wait()

        holder = threading.Thread(target=hold_the_budget)
        holder.start()
        room.wait()
        assert client.post("/api/search?k=1", files=upload(("q", query))).status_code == 503
        release.set()
        holder.join()
        wait_for(lambda: service.abandoned["decode"] == 1, "the decode to give up")
        assert decoded == []
        # "More like this" whose stored vector reads slowly (a cold disk): the index is never searched.
        slow, vectors = threading.Event(), searcher.vectors
        monkeypatch.setattr(searcher, "vectors", lambda ids: slow.wait() and vectors(ids))
        assert client.get("/api/search?like=3").status_code == 503
        slow.set()
        wait_for(lambda: service.abandoned["search"] == 1, "the search to give up")
        assert looked_up == []
        assert 'pipeline_abandoned_work_total{stage="decode"} 1.0' in client.get("/metrics").text


def test_a_served_process_holds_bounded_memory_and_descriptors_under_floods_and_decode_bombs(
    index_dir, tiny_model, gallery, tmp_path
):
    """The service in its own process, as deployed: a flood without the key, slow bodies, 32 16-bit PNGs just
    under Pillow's pixel limit and many concurrent 16-bit uploads; its peak RSS stays under its start-up RSS
    plus the decode budget plus a fixed 160 MiB (request bodies, threads, allocator slack)."""
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    budget_mib = 64
    options = ["--api-key-file", str(key), "--decode-memory-mb", str(budget_mib), "--body-timeout", "1"]
    query = sorted(gallery.rglob("img05.*"))[0].read_bytes()
    with serve_child(index_dir, tiny_model, *options) as (child, url):
        auth = {"X-API-Key": "s3cret"}
        assert httpx.post(f"{url}/api/search?k=1", files=upload(("q", query)), headers=auth).status_code == 200
        start = proc_status(child.pid)
        host = url.removeprefix("http://").encode()
        head = (
            b"POST /api/search HTTP/1.1\r\nHost: " + host + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
        )
        for _ in range(300):  # no key: 401 from the head; 64 KiB of each declared 10 MB sent
            assert raw_request(url, head, b"x" * 65536, refused=True).startswith(b"HTTP/1.1 401")
        slow = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(50)]
        keyed = head.replace(b"\r\nContent-Type", b"\r\nX-API-Key: s3cret\r\nContent-Type")
        for sock in slow:  # with the key, but the body never comes: cut off at the body timeout
            sock.sendall(keyed + b"--b\r\n")
        for sock in slow:
            assert sock.recv(65536).startswith(b"HTTP/1.1 408")
            sock.close()
        side = int(Image.MAX_IMAGE_PIXELS**0.5) - 1  # 9,459 x 9,459 16-bit: 1 GB decoded each, 0.2 MB sent
        stripes = np.full((side, side), 1000, np.uint16)
        stripes[::97] = 40000
        buf = io.BytesIO()
        Image.fromarray(stripes).save(buf, "PNG")
        r = httpx.post(f"{url}/api/search", files=upload(*[("b.png", buf.getvalue())] * 32), headers=auth, timeout=60)
        assert r.status_code == 400 and "over the 42 MiB one upload may use" in r.text  # 2/3 of the budget
        many = [(f"m{i}.png", sixteen_bit_png(1300, seed=i)) for i in range(8)]  # 18 MB decoded each

        def client() -> int:
            return httpx.post(f"{url}/api/search?k=1", files=upload(*many), headers=auth, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: client(), range(8))) == [200] * 8
        end = proc_status(child.pid)
    extra_mib = (end["peak_kib"] - start["rss_kib"]) / 1024
    print(f"RSS at start {start['rss_kib'] / 1024:.0f} MiB, peak {end['peak_kib'] / 1024:.0f} MiB (+{extra_mib:.0f})")
    print(f"descriptors {start['fds']} -> {end['fds']}")
    assert extra_mib < budget_mib + 160
    assert end["fds"] <= start["fds"] + 4


def sixteen_bit_png(side: int, seed: int = 0) -> bytes:
    ramp = np.arange(side, dtype=np.uint32) * 60000 // side  # smooth: a small file, a large decode
    pixels = ((ramp[:, None] + ramp[None, :] // 2 + seed * 997) % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # mode I;16
    return buf.getvalue()


def test_decode_memory_is_budgeted_from_the_header_before_decoding(index_dir, tiny_model, monkeypatch):
    from pipeline.images import decode_cost
    from pipeline.serve import service as service_module

    big, small = sixteen_bit_png(1200), sixteen_bit_png(700, seed=1)
    assert decode_cost(big) == 1200 * 1200 * (2 * 2 + 3 + 4)  # pixels, upright copy, float32, RGB
    service = Service(index_dir, tiny_model, poll=0, decode_memory=12_000_000, max_decode=10_000_000)
    peak, decode = [], service_module.decode_bytes

    def watched(*args, **kwargs):
        peak.append(service.decode_budget.used)
        return decode(*args, **kwargs)

    monkeypatch.setattr(service_module, "decode_bytes", watched)
    with TestClient(create_app(service), base_url=LOCAL) as client:
        r = client.post("/api/search", files=upload(("big.png", big)))
        assert r.status_code == 400 and "decoding it would take 15 MiB, over the 9 MiB one upload may use" in r.text
        assert peak == []  # refused from its header: never decoded
        r = client.post("/api/search?k=1", files=upload(*[(f"s{i}.png", small) for i in range(32)]))
        assert r.status_code == 200 and all(q["results"] for q in r.json())
    cost = decode_cost(small)  # 5.4 MB: two fit in the budget at once, never three
    assert len(peak) == 32 and max(peak) <= 12_000_000 and max(peak) >= cost and service.decode_budget.used == 0


def test_a_full_decode_budget_waits_then_answers_busy():
    from pipeline.errors import BusyError
    from pipeline.serve.limits import DecodeBudget

    budget = DecodeBudget(100)
    with budget.take(80, timeout=1):
        with pytest.raises(BusyError, match="80 MiB|in use"):
            with budget.take(30, timeout=0.05):
                pass
        done = threading.Event()

        def later() -> None:
            with budget.take(30, timeout=10):
                done.set()

        waiter = threading.Thread(target=later)
        waiter.start()
    waiter.join()  # room was made when the first decode ended
    assert done.is_set() and budget.used == 0


def test_search_within_a_filter_over_http(tmp_path, gallery, tiny_model):
    files = sorted(p for p in gallery.rglob("*") if p.is_file())
    meta = tmp_path / "products.csv"
    meta.write_text("path,category\n" + "".join(f"{p},{['shoes', 'bags'][i % 2]}\n" for i, p in enumerate(files)))
    rebuild([gallery], tmp_path / "work", tiny_model, workers=0, progress=False, metadata=[meta])
    service = Service(tmp_path / "work" / "index", tiny_model, poll=0)
    with TestClient(create_app(service), base_url=LOCAL) as client:
        fields = client.get("/api/fields").json()["fields"]
        assert fields["category"] == "string" and fields["width"] == "number" and fields["path"] == "string"
        r = client.post("/api/search?k=20&where=category%3Dbags", files=upload(("q", files[0].read_bytes())))
        hits = r.json()[0]["results"]
        assert r.status_code == 200 and hits and all(h["metadata"]["category"] == "bags" for h in hits)
        r = client.get("/api/search", params={"like": hits[0]["id"], "k": 20, "where": ["category=shoes", "width>10"]})
        assert r.status_code == 200 and all(h["metadata"]["category"] == "shoes" for h in r.json()[0]["results"])
        r = client.post("/api/search?where=colour%3Dred", files=upload(("q", files[0].read_bytes())))
        assert r.status_code == 422 and "no field colour" in r.json()["error"]
        r = client.get("/api/search", params={"like": 0, "where": ["category<x"]})
        assert r.status_code == 422 and "holds text" in r.json()["error"]
        r = client.get("/api/search", params={"like": hits[0]["id"], "where": ["category=hats"]})
        assert r.status_code == 200 and r.json()[0]["results"] == []
