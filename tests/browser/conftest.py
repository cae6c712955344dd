"""The real web frontend (the one the installed ComfyUI serves) in headless Chromium, on the test server."""

from __future__ import annotations

import pytest

from mixofshow.devkit.browser import BrowserUnavailable, Frontend, chromium_path, unavailable_reason


@pytest.fixture(scope="session")
def frontend(server):
    if chromium_path() is None:
        reason = unavailable_reason()
        if reason is None:
            pytest.fail(
                "No Chromium, although scripts/install_browser.sh recorded no reason it could not install one; "
                "run 'make test' (it installs Debian's chromium package) or fix the install."
            )
        pytest.skip(f"browser layer skipped: {reason}")
    try:
        session = Frontend(server.url).open()
    except BrowserUnavailable as exc:
        pytest.skip(f"browser layer skipped: {exc}")
    yield session
    session.close()
