"""The bundled workflows in the real UI: the host ComfyUI's server with the pack on a free localhost port, its own
frontend (comfyui-frontend-package, pinned by the host) in Debian's headless Chromium driven by playwright. The same
checks pass on frontend 1.32.9 (ComfyUI 0.3.75) and 1.37.11 (0.12.1); headless/browser.py names what the two share.

One server and one page for the module: every workflow is opened the way the template browser opens it and checked
as a user would see it; a card of the template browser opens its workflow, and the toy demo, opened from there, is
run from the Run button.
"""
import json
import urllib.request
from pathlib import Path

import pytest

from faithful_inpaint.headless import browser

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
# Loader nodes of public files and the widget naming the file: each needs the frontend's ``models`` entry.
PUBLIC_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "ControlNetLoader": "control_net_name",
                  "CLIPVisionLoader": "clip_name", "ImagePromptAdapterLoader": "adapter_name",
                  "BrushBranchLoader": "branch_name"}
TRAINED_HERE = ("painternet_sd15", "mtadiffusion_sd15")   # branch files this pack trains: no public download


@pytest.fixture(scope="module")
def ui():
    with browser.ComfyServer() as server:
        server.set_settings(browser.QUIET_SETTINGS)
        with browser.ui_page(server.url) as page:
            # errors of the bare UI before any workflow (offline machine, fresh user folder): none may be the pack's
            start_errors = browser.pack_errors(page.console_errors)
            assert not [e for e in start_errors if "faithful" in e.lower() or "workflow_templates" in e], start_errors
            page.console_errors.clear()
            yield server, page


def _rects(state):
    t = state["title_height"]
    return {n["id"]: (n["pos"][0], n["pos"][1] - t, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in state["nodes"]}


def _overlaps(state):
    rects, found = _rects(state), []
    ids = sorted(rects)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ra, rb = rects[a], rects[b]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]:
                found.append((a, b))
    return found


def test_the_ui_is_the_hosts_own_frontend(ui):
    """First, so that -x stops here: each host is tested with the frontend and templates its requirements.txt pins
    (ComfyUI 0.3.75: frontend 1.32.9, templates 0.7.25; 0.12.1: 1.37.11, 0.8.31). Another host's frontend fails the
    checks below for reasons of its own, not the pack's (0.12.1 with 1.32.9: the template browser does not close)."""
    from importlib.metadata import version

    server, page = ui
    pins = browser.host_pins()
    assert "comfyui-frontend-package" in pins, f"{browser.host.comfyui_path()}/requirements.txt pins no frontend"
    fix = "install the host's own: the comfyui-* lines of its requirements.txt (scripts/test_newest_comfyui.sh does)"
    assert browser.frontend_version(page) == pins["comfyui-frontend-package"], fix
    # the server runs in this interpreter: it serves the templates package installed here
    assert version("comfyui-workflow-templates") == pins["comfyui-workflow-templates"], fix


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_readable_with_its_inputs_and_model_downloads(ui, path):
    server, page = ui
    workflow = json.loads(path.read_text())
    page.console_errors.clear()
    browser.load_workflow(page, workflow, path.name)   # returns once the example images show in the loaders
    dialogs = browser.dialog_texts(page)
    state = browser.graph_state(page)
    browser.close_dialogs(page)

    # every node type is installed (no missing-nodes dialog), nothing failed in the console
    assert all(n["registered"] for n in state["nodes"]), [n["type"] for n in state["nodes"] if not n["registered"]]
    assert not [d for d in dialogs if "Missing Node" in d], dialogs
    assert browser.pack_errors(page.console_errors) == []
    # the layout holds at the frontend's own sizes: nothing was enlarged, nothing overlaps, groups hold their nodes
    saved = {n["id"]: n for n in workflow["nodes"]}
    assert {n["id"]: n["size"] for n in state["nodes"]} == {i: n["size"] for i, n in saved.items()}
    assert _overlaps(state) == []
    rects = _rects(state)
    for group in state["groups"]:
        x, y, w, h = group["bounding"]
        inside = [i for i, r in rects.items() if x <= r[0] and r[2] <= x + w and y <= r[1] and r[3] <= y + h]
        assert inside, f"group {group['title']!r} holds no node"
    assert len(state["groups"]) >= 2 and any(g["title"].startswith("1. Inputs") for g in state["groups"])
    # it opens where the canvas draws text, on the note (top-left of the graph, fully on screen)
    assert not state["low_quality"] and state["scale"] * 14 >= state["min_font_size_for_lod"]
    note = next(n for n in state["nodes"] if n["type"] == "MarkdownNote")
    (ox, oy), s = state["offset"], state["scale"]
    left, top = (note["pos"][0] + ox) * s, (note["pos"][1] - state["title_height"] + oy) * s
    assert 0 <= left and 0 <= top and left + note["size"][0] * s <= state["viewport"][0]
    # every public file has its download entry, and the UI's missing-models dialog offers it
    for node in state["nodes"]:
        if node["type"] not in PUBLIC_LOADERS:
            continue
        value = dict(node["widgets"])[PUBLIC_LOADERS[node["type"]]]
        if any(t in value for t in TRAINED_HERE):
            assert value in note_text(workflow)
            continue
        assert node["models"] and value in [m["name"] for m in node["models"]], (node["title"], node["models"])
        for m in node["models"]:
            assert m["url"].startswith("https://huggingface.co/") and m["directory"]
            assert f'{m["directory"]} / {m["name"]}' in "\n".join(dialogs), dialogs
            assert m["url"] in note_text(workflow)
    assert not [d for d in dialogs if "Invalid directory" in d], dialogs   # the pack registers inpaint/, ipadapter/


def note_text(workflow):
    return next(n for n in workflow["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]


def test_template_browser_lists_every_workflow_with_a_thumbnail(ui):
    server, page = ui
    with urllib.request.urlopen(server.url + "/api/workflow_templates") as r:
        listed = json.loads(r.read())
    assert sorted(listed[browser.PACK_FOLDER]) == [p.stem for p in WORKFLOWS]
    for stem in listed[browser.PACK_FOLDER]:     # the thumbnails the cards show
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{browser.PACK_FOLDER}/{stem}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 5000
    browser.open_template_browser(page)
    text = browser.dialog_texts(page)[0]
    assert all(p.stem in text for p in WORKFLOWS)
    # the cards in view show their thumbnails (fetched, then shown as blob: images); none is broken
    images = page.evaluate("""() => Array.from(document.querySelectorAll('.p-dialog img'))
        .map(i => [i.src.slice(0, 5), i.complete, i.naturalWidth])""")
    assert len([i for i in images if i[0] == "blob:" and i[2] > 0]) >= 4, images
    assert not [i for i in images if i[1] and i[2] == 0], images
    browser.close_dialogs(page)


def test_a_card_of_the_template_browser_opens_its_workflow(ui):
    server, page = ui
    path = ROOT / "example_workflows" / "profi_painter.json"
    browser.open_template(page, path.stem)
    state = browser.graph_state(page)
    dialogs = browser.dialog_texts(page)
    browser.close_dialogs(page)
    # the graph is the file's: the same nodes, with their titles (untitled nodes show their display name)
    saved = {n["id"]: (n["type"], n.get("title")) for n in json.loads(path.read_text())["nodes"]}
    assert {n["id"]: (n["type"], n["title"] if saved.get(n["id"], ("", None))[1] else None)
            for n in state["nodes"]} == saved
    assert not [d for d in dialogs if "Missing Node" in d], dialogs
    assert any("Missing Models" in d and "checkpoints / sd-v1-5-inpainting.safetensors" in d for d in dialogs), dialogs


def test_toy_demo_runs_from_the_run_button(ui):
    """The toy demo as a user runs it: open from the template browser, set the schedule to 2 steps in its widget (20
    take minutes on a shared CI CPU; one schedule feeds both samplers), press Run, see both images (the result with
    PAIntA; scene | mask | without PAIntA | with PAIntA)."""
    server, page = ui
    browser.close_dialogs(page)
    browser.open_template(page, "toy_world_demo")
    browser.close_dialogs(page)
    page.console_errors.clear()
    page.evaluate("""() => { const n = window.app.graph.nodes.find(n => n.type === 'BasicScheduler');
                            n.widgets.find(w => w.name === 'steps').value = 2; }""")
    page.get_by_role("button", name="Run", exact=True).first.click()
    page.wait_for_function("""() => window.app.graph.nodes.filter(n => n.type === 'SaveImage')
        .every(n => (window.app.nodeOutputs?.[String(n.id)]?.images?.length ?? 0) > 0)""",
                           timeout=240_000, polling=1000)
    # the images the nodes show, as the browser decodes them from the server
    sizes = page.evaluate("""async () => Promise.all(window.app.graph.nodes.filter(n => n.type === 'SaveImage')
        .map(async n => { const im = window.app.nodeOutputs[String(n.id)].images[0];
            const q = new URLSearchParams({filename: im.filename, subfolder: im.subfolder, type: im.type});
            const bitmap = await createImageBitmap(await (await fetch('/api/view?' + q)).blob());
            return [bitmap.width, bitmap.height]; }))""")
    assert sorted(sizes) == [[256, 256], [256 * 4 + 3 * 8, 256]]
    assert browser.pack_errors(page.console_errors) == []
