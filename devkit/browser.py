"""Drive the real ComfyUI web frontend in headless Chromium: drop a workflow file, read what Run would send.

The frontend is the one the installed ComfyUI serves (comfyui-frontend-package), driven through Playwright over
Debian's ``chromium`` (Playwright's own browser download is not reachable here). Used by the browser tests and by
``scripts/make_ui_workflows.py``, so the UI workflows are laid out by, and checked against, the frontend itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Console lines every start-up of frontend 1.32.9 prints on a fresh base directory (missing user files, the
#: settings store's first run, the public node registry the page may not reach); anything else is a real error.
KNOWN_NOISE = (
    "Failed to load resource: the server responded with a status of 404",
    "Cannot read properties of undefined (reading 'id')",
    "violates the following Content Security Policy directive",
    "net::ERR_FAILED",
)

_READY = """() => window.app && window.app.graph && window.app.canvas && window.app.vueAppReady
    && document.querySelector('#graph-canvas') && window.app.extensionManager?.workflow?.activeWorkflow"""

_INSTRUMENT = """() => {
  if (window.__mos) return;
  window.__mos = {loads: 0, errors: [], missing: null};
  const wrap = (name) => {
    const original = app[name].bind(app);
    app[name] = async (...args) => {
      try { return await original(...args); }
      catch (error) { window.__mos.errors.push(name + ': ' + String(error)); throw error; }
      finally { if (name === 'handleFile') window.__mos.loads += 1; }
    };
  };
  wrap('handleFile');
  app.registerExtension({name: 'mixofshow.test.missingNodes', afterConfigureGraph(missing) { window.__mos.missing = missing; }});
}"""

_DROP = """async ([text, name]) => {
  window.__mos.missing = null;
  const file = new File([text], name, {type: 'application/json'});
  const data = new DataTransfer();
  data.items.add(file);
  const canvas = document.querySelector('#graph-canvas');
  const rect = canvas.getBoundingClientRect();
  const at = {clientX: rect.left + rect.width / 2, clientY: rect.top + rect.height / 2};
  for (const type of ['dragenter', 'dragover', 'drop'])
    canvas.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data, ...at}));
}"""

_STATE = """async () => {
  const prompt = await app.graphToPrompt();
  const canvas = app.canvas;
  const el = document.querySelector('#graph-canvas').getBoundingClientRect();
  const nodes = app.graph._nodes.map((n) => {
    const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
    return {id: n.id, type: n.type, title: n.title, bounding: b, has_errors: !!n.has_errors,
            widgets: (n.widgets || []).map((w) => [w.name, w.value])};
  });
  const groups = (app.graph._groups || app.graph.groups || []).map((g) => ({title: g.title, bounding: Array.from(g._bounding || g.bounding)}));
  return {prompt: prompt.output, workflow: JSON.stringify(prompt.workflow), nodes, groups,
          scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset), low_quality: !!canvas.low_quality,
          canvas_rect: [el.left, el.top, el.width, el.height], missing: window.__mos.missing, errors: window.__mos.errors,
          dialog: Array.from(document.querySelectorAll('.comfy-missing-nodes')).map((e) => e.textContent)};
}"""


#: Written by scripts/install_browser.sh when it cannot install Chromium here (not root, no apt-get): the reason.
UNAVAILABLE_MARKER = os.path.join(
    os.path.expanduser(os.environ.get("MOS_RUNTIME", "~/.cache/mixofshow-runtime")), "browser-unavailable"
)


class BrowserUnavailable(RuntimeError):
    """No Chromium or no Playwright on this machine."""


def unavailable_reason() -> str | None:
    """Why scripts/install_browser.sh could not install a browser here, or None when it did not say."""
    try:
        with open(UNAVAILABLE_MARKER) as f:
            return f.read().strip() or "the browser could not be installed"
    except OSError:
        return None


def chromium_path() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


class Frontend:
    """One headless Chromium page on a running :class:`~.server.ComfyServer`'s web frontend."""

    def __init__(self, server_url: str, width: int = 1920, height: int = 1080):
        self.url = server_url
        self.viewport = {"width": width, "height": height}
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self._playwright = None
        self._context = None
        self.page = None

    def __enter__(self) -> Frontend:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, timeout_ms: int = 90_000) -> Frontend:
        executable = chromium_path()
        if executable is None:
            raise BrowserUnavailable("no Chromium found (install Debian's 'chromium' package)")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise BrowserUnavailable("Playwright is not installed (pip install playwright)") from None
        self._profile = tempfile.mkdtemp(prefix="mos-chromium-")
        self._playwright = sync_playwright().start()
        self._context = self._playwright.chromium.launch_persistent_context(
            self._profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS, viewport=self.viewport
        )
        # nothing off this server may be fetched (there is no network here, and a test must not depend on one)
        self._context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(self.url) else route.abort())
        self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
        self.page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.goto(self.url)
        self.page.wait_for_function(_READY, timeout=timeout_ms)
        self.close_startup_dialogs()
        self.page.evaluate(_INSTRUMENT)
        return self

    def close(self) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None
        if getattr(self, "_profile", None):
            shutil.rmtree(self._profile, ignore_errors=True)

    def close_startup_dialogs(self) -> None:
        """Close the new-user template browser (Escape does not) through the app's own dialog store."""
        self.page.evaluate(
            """() => { const store = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s.get('dialog');
                       store.closeDialog({key: 'global-workflow-template-selector'}); }"""
        )

    def mark(self) -> tuple[int, int]:
        """A point in the page's error logs, for :meth:`real_errors` since then."""
        return len(self.page_errors), len(self.console)

    def real_errors(self, since: tuple[int, int] = (0, 0)) -> list[str]:
        """Page errors and console errors (after ``since``) other than the known start-up noise."""
        console = self.console[since[1] :]
        return self.page_errors[since[0] :] + [line for line in console if not any(n in line for n in KNOWN_NOISE)]

    def drop_file(self, text: str, name: str, timeout: float = 30.0) -> dict:
        """Drop a workflow file on the canvas like a user, wait for the frontend to finish, return :meth:`state`."""
        before = self.page.evaluate("() => window.__mos.loads")
        errors_before = len(self.page_errors)
        self.page.evaluate(_DROP, [text, name])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.page.evaluate("() => window.__mos.loads") > before:
                break
            if len(self.page_errors) > errors_before:  # e.g. broken JSON: handleFile never resolves
                time.sleep(2.0)
                break
            time.sleep(0.1)
        self.page.wait_for_timeout(300)  # let the canvas settle (fit view, first draw)
        return self.state()

    def drop_workflow(self, workflow: dict, name: str) -> dict:
        return self.drop_file(json.dumps(workflow), name)

    def state(self) -> dict:
        """The prompt Run would send (``app.graphToPrompt().output``), node and group boxes, view scale, errors."""
        return self.page.evaluate(_STATE)

    def dismiss_toasts(self) -> None:
        """Close notification toasts and the "Nodes 2.0" banner, so a screenshot shows the graph."""
        self.page.evaluate(
            """() => { document.querySelectorAll('.p-toast-close-button, [aria-label="Close"]').forEach((b) => b.click()); }"""
        )
        self.page.wait_for_timeout(300)

    def canvas_clip(self) -> dict:
        """The part of the page the graph canvas occupies, for screenshots."""
        left, top, width, height = self.page.evaluate(
            "() => { const r = document.querySelector('#graph-canvas').getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }"
        )
        return {"x": left + 60, "y": top + 50, "width": width - 60, "height": height - 50}

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def screenshot(self, path: str) -> str:
        self.page.screenshot(path=path)
        return path
