"""Make docs/serve.png, the README's picture of the `serve` page: the generated bird set indexed with `lite0`,
served, and searched in headless Chromium (Debian's /usr/bin/chromium through Playwright) with a new picture
of an indexed class; saved as a 256-colour PNG of at most 300 KB.

    python scripts/serve_screenshot.py [--out docs/serve.png] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_serve import start_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_BYTES = 300_000


def main() -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from indexer.build.pipeline import IndexConfig, run_index
    from retrieval.data.generate import GenerateConfig, make_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve.png")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="serve-shot-"))
    images = make_dataset(GenerateConfig(work / "birds", classes=12, per_class=10, size=160)).root / "images"
    fresh = make_dataset(GenerateConfig(work / "new", classes=12, per_class=1, size=160, seed=1)).root
    query = sorted((fresh / "images").glob("*/*.jpg"))[3]  # a picture the index has never seen
    db = work / "db"
    run_index(IndexConfig(folder=images, db_dir=db, model="lite0"))
    proc, base = start_server(db)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('stats').textContent.includes('images')")
            page.fill("#k", "12")
            for _ in range(2):  # the first search warms the server up; the picture shows the second
                page.evaluate("document.getElementById('results').replaceChildren()")
                page.set_input_files("#file", str(query))
                page.wait_for_selector(".result")
            page.wait_for_function("[...document.querySelectorAll('.result img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            png = page.screenshot()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    size = args.out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size:,} bytes, over {MAX_BYTES:,}")
    print(f"{args.out}: {image.width}x{image.height}, {size:,} bytes (query {query.name})")


if __name__ == "__main__":
    main()
