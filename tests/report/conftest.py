"""A real headless browser for the report's tests: Debian's chromium driven by Playwright.

Outside CI a machine without chromium skips these tests (scripts/install-browser.sh installs
it); under CI=true a missing browser is a failure, never a silent skip."""

from __future__ import annotations

import os
import shutil

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must run the report's browser test (scripts/install-browser.sh)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _missing("no chromium on this machine")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS)
        yield b
        b.close()


class Opened:
    """A page opened from a file, with everything its console and scripts said."""

    def __init__(self, browser, path, width: int = 1300) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.messages: list[tuple[str, str]] = []
        self.page.on("console", lambda m: self.messages.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.messages.append(("pageerror", str(e))))
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_load_state("load")

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [m for m in self.messages if m[0] in ("error", "pageerror", "warning")]


@pytest.fixture
def open_page(browser):
    pages = []

    def _open(path, width: int = 1300) -> Opened:
        pages.append(Opened(browser, path, width))
        return pages[-1]

    yield _open
    for p in pages:
        p.page.close()
