"""`python cli.py serve` as a real process on 127.0.0.1, driven by Debian's headless Chromium through Playwright
(never a downloaded browser): upload an image and see it first in the grid, click a result and see its
neighbours as brute force over the stored embeddings ranks them, filter by label, change k, tick query
expansion and see the expanded ranking, an error shown
as a message, a class named like an HTML tag shown as text; fails on any JavaScript error. Plus a raw socket
that announces a 1 GB upload and gets 413 without sending it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.index_support import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HTML_LABEL = "<img src=x onerror=alert(1)>"
KEY = "k3y-for-the-browser-test"
STATS_SHOWN = "document.getElementById('stats').textContent.includes('images')"  # the page has loaded its stats

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run_dir, tmp_path_factory):
    """The generated set (one class folder renamed like an HTML tag) indexed with the tiny encoder, its stored
    embeddings, and `serve` running on it."""
    pytest.importorskip("fastapi")

    from indexer.build.pipeline import IndexConfig, run_index
    from indexer.store.lmdb_store import Store
    from retrieval.data.generate import GenerateConfig, make_dataset

    root = tmp_path_factory.mktemp("browser")
    generated = make_dataset(GenerateConfig(root / "birds", classes=4, per_class=6, size=96)).root / "images"
    images = root / "images"
    shutil.copytree(generated, images)
    odd = sorted(p for p in images.iterdir() if p.is_dir())[-1]
    odd.rename(images / HTML_LABEL)
    db = root / "db"
    run_index(IndexConfig(folder=images, db_dir=db, model=str(tiny_run_dir), workers=0))
    with Store.open(db) as store, store.snapshot() as snap:
        ids = snap.ids()
        items = snap.items(ids)
        stored = {"ids": ids, "vectors": snap.vectors(ids), "paths": [str(images / i.relpath) for i in items],
                  "relpaths": [i.relpath for i in items],
                  "labels": [i.label for i in items]}
    with _serving(db, root / "serve.log") as (base, port):
        yield {"base": base, "port": port, "images": images, "db": db, **stored}


@pytest.fixture(scope="module")
def keyed(server, tmp_path_factory):
    """A second `serve` of the same DB that requires an access key."""
    key_file = tmp_path_factory.mktemp("keyed") / "key"
    key_file.write_text(KEY + "\n")
    with _serving(server["db"], key_file.with_name("serve.log"), "--api-key-file", str(key_file)) as (base, _):
        yield {**server, "base": base}


@contextlib.contextmanager
def _serving(db: Path, log_path: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """`python cli.py serve` on a free loopback port until the block ends: (base URL, port)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "cli.py", "serve", "--db", str(db), "--port", str(port), "--device", "cpu", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "serve did not answer /healthz in 120 s"
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_an_announced_huge_upload_gets_413_without_being_sent(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=20) as conn:
        conn.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n"
                     + b"x" * 4096)  # 4 KB of the announced 1 GB, then nothing: the answer must come anyway
        answer = b""
        while b"}" not in answer:  # the JSON body may come in a later packet; recv times out after 20 s
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    text = answer.decode("latin-1")
    assert text.startswith("HTTP/1.1 413"), text
    assert "larger than the limit of 20 MB" in text


def _launch(playwright):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; CI installs it)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _page(browser, errors: list[str], *, console: bool = False, **options):
    """A new page whose script errors (with `console`, also console errors and dialogs) are appended to `errors`."""
    page = browser.new_page(**options)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    if console:
        page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    return page


def test_search_click_filter_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _page(browser, errors, console=True, viewport={"width": 1200, "height": 900})
            page.goto(server["base"] + "/")
            page.wait_for_function(STATS_SHOWN)
            assert page.text_content("#stats").startswith(f"{len(server['ids'])} images")

            # Upload an indexed image: it comes first, with similarity 1.
            row = 5
            page.set_input_files("#file", server["paths"][row])
            page.wait_for_selector(".result")
            cards = page.locator(".result")
            assert cards.count() == 10
            assert cards.nth(0).get_attribute("title") == server["relpaths"][row]
            assert cards.nth(0).locator(".score").text_content() == "#1  1.0000"
            assert "embed" in page.text_content("#summary") and " ms" in page.text_content("#summary")
            page.wait_for_function("[...document.querySelectorAll('.result img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")

            # Click the second result: its neighbours, ranked as brute force over the stored embeddings.
            clicked = int(cards.nth(1).get_attribute("data-id"))
            cards.nth(1).click()
            page.wait_for_selector(f"#results[data-query-id='{clicked}'] .result")
            assert page.text_content("#query-name") == f"more like {server['relpaths'][_row(server, clicked)]}"
            shown = [int(x) for x in page.locator(".result").evaluate_all("els => els.map(e => e.dataset.id)")]
            assert shown == _brute_force(server, clicked, 10)
            page.screenshot(path=str(tmp_path / "serve-more-like-this.png"), full_page=True)

            # Filter by label: the server searches that label alone, k of them when it has them.
            wanted = next(x for x in server["labels"] if x != server["labels"][_row(server, clicked)])
            page.select_option("#label", value=wanted)
            expected = _brute_force(server, clicked, 10, label=wanted)
            page.wait_for_function(f"[...document.querySelectorAll('.result')].map(e => +e.dataset.id).join() "
                                   f"=== {','.join(map(str, expected))!r}")
            assert set(page.locator(".result .label").all_text_contents()) == {wanted}
            assert len(expected) == server["labels"].count(wanted)  # 6 of a label with 6 items, k being 10
            page.select_option("#label", value="")
            page.wait_for_function("document.querySelectorAll('.result').length === 10")

            # A class folder named like an HTML tag is shown as text, never run.
            odd_row = server["labels"].index(HTML_LABEL)
            page.fill("#k", "3")
            page.set_input_files("#file", server["paths"][odd_row])
            page.wait_for_function(f"document.querySelector('.result')?.title === {server['relpaths'][odd_row]!r}")
            assert page.locator(".result").count() == 3
            assert page.locator(".result .label").nth(0).text_content() == HTML_LABEL
            assert page.locator("#results img[src='x']").count() == 0
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            assert (tmp_path / "serve.png").stat().st_size > 10_000
            assert errors == []

            # Not an image: a message naming it once, nothing of the previous query left, and the page still works.
            bad = tmp_path / "notes.txt"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:not([hidden])")
            assert page.text_content("#error") == "error 400: notes.txt: not a recognised image format"
            assert page.locator(".result").count() == 0 and page.text_content("#summary") == ""
            assert page.is_hidden("#query-img") and "notes.txt" not in page.text_content("#drop")
            assert page.text_content("main").count("notes.txt") == 1
            page.set_input_files("#file", server["paths"][row])
            page.wait_for_function(f"document.querySelector('.result')?.title === {server['relpaths'][row]!r}")
            assert page.is_hidden("#error")
            # The only complaint is the browser's own note of the 400 response itself.
            assert all("status of 400" in e for e in errors) and len(errors) == 1, errors
        finally:
            browser.close()


def test_the_expand_toggle_sends_expand_and_shows_the_expanded_ranking(server):
    """Ticked, an upload is searched with &expand=K (K from its box, 5 by default) and the grid is the API's
    expanded answer, which is brute-force aQE over the stored embeddings and differs from the plain one here."""
    sync_api = pytest.importorskip("playwright.sync_api")
    import httpx

    from indexer.store.expand import expand

    def brute(row: int, k: int, width: int) -> tuple[list[int], list[int]]:
        """(plain, expanded) top-`width` ids of the stored embedding at `row` (an upload of it is not excluded)."""
        vectors, query = server["vectors"], server["vectors"][row][None]
        top = np.argsort(-(vectors @ query[0]), kind="stable")[:k]
        expanded = expand(query, (vectors @ query[0])[top][None], vectors[top][None], 3.0)[0]
        ranked = [np.argsort(-(vectors @ q), kind="stable")[:width] for q in (query[0], expanded)]
        return server["ids"][ranked[0]].tolist(), server["ids"][ranked[1]].tolist()

    # an image whose plain and expanded (K=5) rankings differ by brute force
    row = next(r for r in range(len(server["ids"])) if len(set(map(tuple, brute(r, 5, 10)))) == 2)
    plain, expanded = brute(row, 5, 10)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _page(browser, errors)
            page.goto(server["base"] + "/")
            page.wait_for_function(STATS_SHOWN)
            assert page.input_value("#expand-k") == "5" and not page.is_checked("#expand")

            def shown() -> list[int]:
                return [int(x) for x in page.locator(".result").evaluate_all("els => els.map(e => e.dataset.id)")]

            def wait_for(ids: list[int]) -> None:
                page.wait_for_function(f"[...document.querySelectorAll('.result')].map(e => +e.dataset.id).join() "
                                       f"=== {','.join(map(str, ids))!r}")

            def answered(check: Callable[[str], bool]) -> Any:
                return page.expect_response(lambda r: "/api/search" in r.url and check(r.url))

            with answered(lambda url: "expand=" not in url):
                page.set_input_files("#file", server["paths"][row])
            wait_for(plain)
            with answered(lambda url: url.endswith("&expand=5")):
                page.check("#expand")   # ticking it searches the same upload again, expanded
            wait_for(expanded)
            with open(server["paths"][row], "rb") as f:
                answer = httpx.post(server["base"] + "/api/search?k=10&expand=5", files={"image": f}, timeout=60)
            assert shown() == [hit["id"] for hit in answer.json()["results"]] == expanded
            with answered(lambda url: url.endswith("&expand=2")):
                page.fill("#expand-k", "2")
                page.dispatch_event("#expand-k", "change")
            wait_for(brute(row, 2, 10)[1])
            with answered(lambda url: "expand=" not in url):
                page.uncheck("#expand")
            wait_for(plain)
            assert errors == []
        finally:
            browser.close()


def _row(server: dict, item_id: int) -> int:
    return int(np.flatnonzero(server["ids"] == item_id)[0])


def _brute_force(server: dict, item_id: int, k: int, label: str | None = None) -> list[int]:
    ids, vectors = server["ids"], server["vectors"]
    row = _row(server, item_id)
    scores = vectors @ vectors[row]
    scores[row] = -np.inf
    if label is not None:
        scores[np.array(server["labels"]) != label] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order[np.isfinite(scores[order])]].tolist()


def test_an_older_answer_arriving_after_a_newer_search_is_never_shown(server):
    """The expanded search of an upload is held back by the browser until the plain search that replaced it has
    been shown; its late answer must not replace the newer one (nor leave the page busy)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    row = 3
    plain = _brute_force_upload(server, row, 10)
    held: list = []
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _page(browser, errors)
            page.route("**/api/search**", lambda route: held.append(route) if "expand=" in route.request.url
                       else route.continue_())
            page.goto(server["base"] + "/")
            page.wait_for_function(STATS_SHOWN)
            page.check("#expand")
            page.set_input_files("#file", server["paths"][row])   # searched with &expand=5: held
            page.wait_for_function("document.body.classList.contains('busy')")
            with page.expect_response(lambda r: "/api/search" in r.url and "expand=" not in r.url):
                page.uncheck("#expand")                               # the same upload, plain: answered
            page.wait_for_function(f"[...document.querySelectorAll('.result')].map(e => +e.dataset.id).join() "
                                   f"=== {','.join(map(str, plain))!r}")
            assert len(held) == 1
            stale = held[0]
            with page.expect_response(lambda r: "expand=" in r.url):
                stale.fulfill(response=stale.fetch())                 # the older answer arrives now
            page.wait_for_timeout(300)                                # let the page's handler run
            shown = page.locator(".result").evaluate_all("els => els.map(e => +e.dataset.id)")
            assert shown == plain
            assert not page.evaluate("document.body.classList.contains('busy')")
            assert errors == []
        finally:
            browser.close()


def _brute_force_upload(server: dict, row: int, k: int) -> list[int]:
    """Top-k ids for an upload of the item at `row` (it finds itself first: an upload is not excluded)."""
    vectors = server["vectors"]
    order = np.argsort(-(vectors @ vectors[row]), kind="stable")[:k]
    return server["ids"][order].tolist()


def test_the_page_asks_for_the_key_once_per_tab(keyed):
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _page(browser, errors, console=True)
            page.goto(keyed["base"] + "/")
            page.wait_for_selector("#auth:not([hidden])")
            assert page.text_content("#auth-msg") == "This server needs an access key."
            page.fill("#key", "not-the-key")
            page.click("#auth button")
            page.wait_for_function("document.getElementById('auth-msg').textContent.includes('refused')")
            assert page.is_visible("#auth")
            page.fill("#key", KEY)
            page.click("#auth button")
            page.wait_for_function(STATS_SHOWN)
            assert page.is_hidden("#auth")
            page.set_input_files("#file", keyed["paths"][2])
            page.wait_for_selector(".result")
            assert page.locator(".result").nth(0).get_attribute("title") == keyed["relpaths"][2]
            page.wait_for_function("[...document.querySelectorAll('.result img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")  # thumbnails sent the key too
            page.reload()  # the same tab keeps the key: no second question
            page.wait_for_function(STATS_SHOWN)
            assert page.is_hidden("#auth")
            fresh = browser.new_page()  # another tab asks again
            fresh.goto(keyed["base"] + "/")
            fresh.wait_for_selector("#auth:not([hidden])")
            # The only complaints are the browser's notes of the 401 answers themselves.
            assert errors and all("status of 401" in e for e in errors), errors
        finally:
            browser.close()
