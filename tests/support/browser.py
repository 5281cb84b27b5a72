"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download),
against the same real processes as the other system tests (``tests.support.processes``): a throwaway
redis-server, a Celery worker, uvicorn. A pytest plugin: the root conftest registers it.

Screenshots go to ``tests/system/artifacts/`` (ignored by git). Every browser console message and page
error is collected; a test fails on any error it did not say it expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "system" / "artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass
class BrowserLog:
    """The page's console messages and uncaught errors, as ``(type, text)``."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)

    def expect_error(self, text: str) -> None:
        """An error whose text contains ``text`` is expected (the browser logs each 4xx response it got)."""
        self.expected.append(text)

    def errors(self) -> list[str]:
        return [
            f"{kind}: {text}"
            for kind, text in self.entries
            if kind in ("error", "pageerror") and not any(part in text for part in self.expected)
        ]

    def assert_clean(self) -> None:
        assert not self.errors(), "errors in the browser:\n" + "\n".join(self.errors())


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/ensure-venv installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console() -> BrowserLog:
    return BrowserLog()


def new_page(browser, api: str, console: BrowserLog, viewport: dict):
    context = browser.new_context(base_url=api, viewport=viewport)
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("console", lambda message: console.entries.append((message.type, message.text)))
    page.on("pageerror", lambda error: console.entries.append(("pageerror", str(error))))
    return context, page


def open_page(browser, api, console, viewport: dict) -> Iterator:
    """A fresh browser context (its own localStorage) at ``viewport``; its log must end clean."""
    context, page = new_page(browser, api, console, viewport)
    yield page
    context.close()
    console.assert_clean()


@pytest.fixture
def page(browser, api, console) -> Iterator:
    yield from open_page(browser, api, console, DESKTOP)


@pytest.fixture
def phone_page(browser, api, console) -> Iterator:
    yield from open_page(browser, api, console, PHONE)


def screenshot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
