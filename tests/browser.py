"""Headless Chromium for tests: the DOM after scripts ran, console errors, screenshots.

Uses only the Chromium command line (no extra Python packages)::

    dom, errors = dump_dom(file_url(page), budget_ms=5000)
    assert errors == []
    assert len(elements_with_class(dom, "plot-container")) == 3
    screenshot(file_url(page), ARTIFACTS / "page.png", size=(1400, 4000))

    # Or all at once, in one Chromium start (a few seconds each on a small machine):
    shown = render(file_url(page), budget_ms=5000, screenshot_path=ARTIFACTS / "page.png")

Tests that need Chromium mark themselves with :data:`requires_chromium`, which skips them when
no browser is found. Set ``HPSEARCH_CHROMIUM`` to use a browser other than
``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import pytest

__all__ = [
    "BrowserError",
    "Page",
    "chromium_path",
    "console_errors",
    "console_messages",
    "dump_dom",
    "elements_with_class",
    "file_url",
    "render",
    "requires_chromium",
    "screenshot",
]

DEFAULT_CHROMIUM = "/usr/bin/chromium"
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# Chromium logs every console message at INFO, whatever its level, as
# [pid:tid:time:INFO:CONSOLE:line] "text", source: url (line)
_CONSOLE = re.compile(r'^\[[^\]\n]*:CONSOLE[^\]\n]*\] "(.*?)", source: ', re.MULTILINE | re.DOTALL)
# So errors are recognized by their text: uncaught exceptions, and Error objects logged.
_ERROR = re.compile(r"^(Uncaught\b|\w*Error\b|Failed to load resource\b)")


class BrowserError(RuntimeError):
    """Chromium failed to run, crashed, or timed out."""


def chromium_path() -> str | None:
    """The Chromium executable to use, or None when there is none."""
    candidate = os.environ.get("HPSEARCH_CHROMIUM", DEFAULT_CHROMIUM)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


requires_chromium = pytest.mark.skipif(
    chromium_path() is None, reason="headless Chromium not found (set HPSEARCH_CHROMIUM)"
)


def file_url(path: str | Path) -> str:
    """``file://`` URL of a local file."""
    return Path(path).resolve().as_uri()


def _run_chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    executable = chromium_path()
    if executable is None:
        raise BrowserError("headless Chromium not found (set HPSEARCH_CHROMIUM)")
    # A fresh profile per run: no state leaks between tests or from a previous crash.
    with tempfile.TemporaryDirectory(prefix="hpsearch-chromium-") as profile:
        command = [executable, *_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrowserError(f"Chromium timed out after {timeout_s}s: {command}") from exc
    if result.returncode != 0:
        raise BrowserError(
            f"Chromium exited with {result.returncode}: {command}\n{result.stderr[-3000:]}"
        )
    return result


def console_messages(stderr: str) -> list[str]:
    """Texts of the page's console messages found in Chromium's stderr log."""
    return _CONSOLE.findall(stderr)


def console_errors(messages: list[str]) -> list[str]:
    """Messages that are errors: uncaught exceptions, logged Error objects, failed loads.

    Chromium's log does not record a message's level, so ``console.error("plain text")`` is
    indistinguishable from ``console.log`` and is not reported.
    """
    return [m for m in messages if _ERROR.match(m)]


class Page(NamedTuple):
    """What one Chromium run saw."""

    dom: str
    """The DOM serialized after scripts ran for the virtual-time budget."""
    console: list[str]
    """Every console message."""
    errors: list[str]
    """The console messages that are errors (see :func:`console_errors`)."""
    screenshot: Path | None


def render(
    url: str,
    *,
    budget_ms: int = 5000,
    screenshot_path: str | Path | None = None,
    size: tuple[int, int] = (1400, 4000),
    timeout_s: float = 120,
) -> Page:
    """Load ``url`` once: the DOM after its scripts ran, its console, optionally a PNG.

    Args:
        url: Page to load, e.g. from :func:`file_url`.
        budget_ms: Virtual time the page gets to run scripts and timers before the dump.
        screenshot_path: Where to save a PNG of the window; None for no screenshot.
        size: Window (width, height) in pixels.
        timeout_s: Wall-clock limit for Chromium.

    Raises:
        BrowserError: If Chromium is missing, fails, times out or writes no screenshot.
    """
    args = ["--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}"]
    shot = None
    if screenshot_path is not None:
        shot = Path(screenshot_path).resolve()
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.unlink(missing_ok=True)
        args += ["--hide-scrollbars", f"--screenshot={shot}"]
    args += [f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    result = _run_chromium(args, timeout_s)
    if shot is not None and not shot.is_file():
        raise BrowserError(f"Chromium wrote no screenshot at {shot}")
    messages = console_messages(result.stderr)
    return Page(result.stdout, messages, console_errors(messages), shot)


def dump_dom(url: str, budget_ms: int = 5000, timeout_s: float = 120) -> tuple[str, list[str]]:
    """Load ``url``; return the DOM after its scripts ran, and the console errors.

    Raises:
        BrowserError: If Chromium is missing, fails or times out.
    """
    page = render(url, budget_ms=budget_ms, timeout_s=timeout_s)
    return page.dom, page.errors


def screenshot(
    url: str,
    path: str | Path,
    size: tuple[int, int] = (1400, 4000),
    budget_ms: int = 5000,
    timeout_s: float = 120,
) -> Path:
    """Save a PNG of ``url`` rendered in a window of ``size`` (width, height) pixels.

    Raises:
        BrowserError: If Chromium fails or writes no file.
    """
    page = render(url, budget_ms=budget_ms, screenshot_path=path, size=size, timeout_s=timeout_s)
    assert page.screenshot is not None
    return page.screenshot


class _ClassFinder(HTMLParser):
    def __init__(self, class_name: str) -> None:
        super().__init__(convert_charrefs=True)
        self.class_name = class_name
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if self.class_name in attributes.get("class", "").split():
            self.found.append({"tag": tag, **attributes})


def elements_with_class(dom: str, class_name: str) -> list[dict[str, str]]:
    """Attributes (plus ``tag``) of every element whose class list has ``class_name``.

    Parses the HTML, so text inside scripts (such as an inlined plotly.js) never counts.
    """
    finder = _ClassFinder(class_name)
    finder.feed(dom)
    finder.close()
    return finder.found
