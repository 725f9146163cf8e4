"""The real ComfyUI server with this pack, and its web UI in headless Chromium (the browser test, thumbnails).

    with ComfyServer() as server, ui_page(server.url) as page:
        load_workflow(page, json.loads(path.read_text()), path.name)

``ComfyServer`` runs ComfyUI's own ``main.py`` (the host of :mod:`headless.host`) on a free localhost port, with a
fresh base directory whose ``custom_nodes/faithful-inpaint`` links to this checkout. The browser is the system's
Chromium (``CHROMIUM`` or /usr/bin/chromium, installed by scripts/setup_env.sh), driven by playwright; playwright
never downloads a browser here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from faithful_inpaint.devtools import host

PACK_FOLDER = "faithful-inpaint"      # the custom_nodes folder name: the template browser's category
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's server on 127.0.0.1:<free port>; its log goes to ``<base>/server.log``."""

    def __init__(self, start_timeout: float = 180.0):
        self.start_timeout = start_timeout
        self.base = Path(tempfile.mkdtemp(prefix="faithful-inpaint-ui-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def __enter__(self):
        (self.base / "custom_nodes").mkdir()
        (self.base / "custom_nodes" / PACK_FOLDER).symlink_to(host.PACK_ROOT, target_is_directory=True)
        main = host.comfyui_path() / "main.py"
        self.log = open(self.base / "server.log", "w")
        cmd = [sys.executable, str(main), "--cpu", "--base-directory", str(self.base), "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        self.process = subprocess.Popen(cmd, cwd=str(main.parent), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200:
                        return self
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log_text()}")

    def set_settings(self, settings: dict) -> None:
        """Write UI settings for the default user (before the page opens)."""
        import json

        for key, value in settings.items():
            req = urllib.request.Request(f"{self.url}/api/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).close()

    def log_text(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text(errors="replace")[-6000:]

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def ui_page(url: str, width: int = 1600, height: int = 900):
    """A playwright page on the UI, ready (the graph app exists); ``page.console_errors`` collects the console's
    errors and uncaught exceptions."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no Chromium found: install Debian's chromium (scripts/setup_env.sh does) or set CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            # a first-visit banner over the canvas (the new Vue nodes); tests and thumbnails show the canvas
            page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page.console_errors = []
            page.on("console", lambda m: m.type == "error" and page.console_errors.append(
                f"{m.text} ({(m.location or {}).get('url', '')})"))
            page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                   "Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100",
                                   timeout=120_000)
            page.wait_for_timeout(1000)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict, name: str) -> None:
    """Open a workflow as the template browser does (``app.loadGraphData``, the saved view restored)."""
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [workflow, name])
    _wait_for_example_images(page)


def _wait_for_example_images(page) -> None:
    # the image loaders show their image once it has loaded (from the server's input folder)
    page.wait_for_function("""() => window.app.graph.nodes
        .filter(n => n.type === 'LoadImage' || n.type === 'LoadImageMask').every(n => n.imgs?.[0]?.complete)""",
                           timeout=15_000, polling=100)
    page.wait_for_timeout(300)


def frontend_version(page) -> str:
    """The version of the frontend the page runs (comfyui-frontend-package)."""
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")


def host_pins() -> dict[str, str]:
    """The exact versions the host's requirements.txt pins (``name==version`` lines), e.g. its frontend: 1.32.9 for
    ComfyUI 0.3.75, 1.37.11 for 0.12.1. Each host is tested with its own frontend (scripts/test_newest_comfyui.sh
    installs them)."""
    path = host.comfyui_path() / "requirements.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    pins = (line.split("#")[0].strip().split("==") for line in lines)
    return {p[0].strip().lower().replace("_", "-"): p[1].strip() for p in pins if len(p) == 2}


# A new user's first visit opens the template browser; the tests and thumbnails start from the canvas.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True}


def dialog_texts(page) -> list[str]:
    """The text of every open dialog (missing models, missing nodes, errors)."""
    return [d.inner_text() for d in page.locator(".p-dialog").all()]


# The button nearest a dialog's top-right corner: its close button (the template browser has no label on it and
# ignores Escape).
CLOSE_BUTTON_JS = """() => {
  const d = document.querySelector('.p-dialog'); if (!d) return null;
  const box = d.getBoundingClientRect();
  const near = Array.from(d.querySelectorAll('button')).map(b => b.getBoundingClientRect())
    .filter(r => r.width > 0 && r.top - box.top < 120)
    .sort((a, b) => (b.right - b.top) - (a.right - a.top))[0];
  return near ? [near.left + near.width / 2, near.top + near.height / 2] : null;
}"""


def close_dialogs(page) -> None:
    """Close every open dialog (Escape, else the button in its top-right corner)."""
    for _ in range(6):
        count = page.locator(".p-dialog").count()
        if count == 0:
            return
        page.keyboard.press("Escape")
        # A dialog closing on Escape stays in the page for its leave transition; a click on it then (a slow CPU)
        # starts the header's drag on a dialog already gone, an error in the console (seen with frontend 1.32.9).
        if _fewer_dialogs(page, count):
            continue
        point = page.evaluate(CLOSE_BUTTON_JS)
        if point:
            page.mouse.click(*point)
            _fewer_dialogs(page, count)
    if page.locator(".p-dialog").count():
        raise RuntimeError(f"a dialog stays open: {dialog_texts(page)[0][:300]}")


def _fewer_dialogs(page, count: int, timeout: float = 1500) -> bool:
    """Whether fewer than ``count`` dialogs are in the page within ``timeout`` ms."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("n => document.querySelectorAll('.p-dialog').length < n", arg=count,
                               timeout=timeout, polling=50)
        return True
    except PlaywrightTimeout:
        return False


# The graph as the frontend holds it after loading: live sizes (the frontend enlarges nodes), groups, the view.
GRAPH_STATE_JS = """() => {
  const c = window.app.canvas, g = window.app.graph, T = window.LiteGraph.NODE_TITLE_HEIGHT;
  return {
    scale: c.ds.scale, offset: Array.from(c.ds.offset), low_quality: c.low_quality,
    min_font_size_for_lod: c.min_font_size_for_lod,
    viewport: [c.canvas.width / (window.devicePixelRatio || 1), c.canvas.height / (window.devicePixelRatio || 1)],
    title_height: T,
    nodes: g.nodes.map(n => ({id: n.id, type: n.type, title: n.title, pos: Array.from(n.pos),
                             size: Array.from(n.size), min_size: Array.from(n.computeSize()),
                             registered: !!window.LiteGraph.registered_node_types[n.type],
                             has_errors: !!n.has_errors, models: n.properties?.models ?? null,
                             widgets: (n.widgets ?? []).map(w => [w.name, w.value])})),
    groups: g.groups.map(gr => ({title: gr.title, bounding: Array.from(gr._bounding ?? gr.bounding)})),
  };
}"""


def graph_state(page) -> dict:
    return page.evaluate(GRAPH_STATE_JS)


def open_template_browser(page, category: str = PACK_FOLDER) -> None:
    """Open Workflow > Browse Templates on the pack's category."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(category, exact=True).first.click()
    page.wait_for_timeout(1500)


def open_template(page, stem: str, category: str = PACK_FOLDER) -> None:
    """Open a bundled workflow as a user does: the template browser on the pack's category, a click on its card.
    Returns once it is the active workflow and its example images show (dialogs it opens, e.g. missing models, stay
    open)."""
    open_template_browser(page, category)
    # The card's test id is the same in frontend 1.32.9 (ComfyUI 0.3.75) and 1.37.11 (0.12.1), and so is the
    # workflow store that holds the active workflow: a new one, named after the template, once the card has opened.
    page.evaluate("() => { window.__faithfulPrevious = window.app.extensionManager.workflow.activeWorkflow; }")
    page.locator(f'[data-testid="template-workflow-{stem}"]').click()
    page.wait_for_function("""stem => { const w = window.app.extensionManager.workflow.activeWorkflow;
        return w && w !== window.__faithfulPrevious && w.filename.startsWith(stem); }""",
                           arg=stem, timeout=15_000, polling=100)
    _wait_for_example_images(page)


# Errors the offline test machine causes, not the pack: the UI asks api.comfy.org and huggingface.co for news, node
# registry entries and the sizes of missing models.
OFFLINE_ERRORS = ("ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED", "ERR_CONNECTION_REFUSED",
                  "Error fetching file size")


def pack_errors(errors: list[str]) -> list[str]:
    return [e for e in errors if not any(marker in e for marker in OFFLINE_ERRORS)]
