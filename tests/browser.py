"""Headless Debian chromium through Playwright for the page tests; never downloads a browser."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def require_playwright() -> Any:
    """playwright.sync_api, or skip the calling test module with the reason."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@contextmanager
def offline_browser(profile_dir: Path, server_url: str) -> Iterator[Any]:
    """A browser context that may fetch only from server_url: any other request is aborted and listed in
    context.outside_requests (the pages must work offline)."""
    sync_api = require_playwright()
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        )
        context.set_default_timeout(15_000)
        outside: list[str] = []

        def only_this_server(route: Any) -> None:
            if route.request.url.startswith(server_url + "/"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_this_server)
        context.outside_requests = outside
        try:
            yield context
        finally:
            context.close()
