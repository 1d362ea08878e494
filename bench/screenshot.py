"""`python -m bench.screenshot` (`make docs-screenshot`): the page's picture in the docs,
docs/images/page.png, taken the way people see it: Debian's Chromium (headless, driven by
Playwright) on a real gunicorn, after a real run of six chunks.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.support import Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PICTURE = Path(__file__).resolve().parent.parent / "docs" / "images" / "page.png"
# A near-copy, a pair only the number guard holds apart, and three distinct chunks.
CHUNKS = [
    "React is a JavaScript library for building user interfaces.",
    "React.js is a JS library for building UIs.",
    "Vue is a progressive JavaScript framework.",
    "Revenue rose 3% in the second quarter.",
    "Revenue rose 5% in the second quarter.",
    "Svelte compiles components to plain JavaScript at build time.",
]


def main() -> None:
    server = Server().start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.get_by_label("Chunks", exact=True).fill("\n\n".join(CHUNKS))
            page.get_by_role("button", name="De-duplicate").click()
            page.locator("#result").wait_for(state="visible", timeout=90_000)
            PICTURE.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(PICTURE), full_page=True)
            browser.close()
    finally:
        server.stop()
    print(f"took {PICTURE.relative_to(PICTURE.parents[2])}")


if __name__ == "__main__":
    main()
