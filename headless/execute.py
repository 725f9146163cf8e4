"""Run an API prompt through ComfyUI's own execution engine, without the web server.

This is the code path of the UI's Queue button: ``execution.validate_prompt`` then ``execution.PromptExecutor.execute``
(as ``main.py``'s ``prompt_worker`` calls it), with :class:`HeadlessServer` standing in for ``PromptServer``: it
receives the same messages the browser would (``executing``, ``progress``, ``executed``, ``execution_error`` ...) and
hands them to a callback. The UI workflow, when given, is embedded in saved PNGs exactly as the UI does
(``extra_pnginfo.workflow``). Ctrl-C interrupts the run the way the UI's Cancel button does.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

CLIENT_ID = "faithful-inpaint-headless"


class RunError(RuntimeError):
    """ComfyUI rejected or failed the prompt; the message carries ComfyUI's report (node id, type, message)."""


class RunInterrupted(RunError):
    """The run was interrupted (Ctrl-C, or ``comfy.model_management.interrupt_current_processing``)."""


class HeadlessServer:
    """The part of ``server.PromptServer`` that the executor uses: records messages and forwards them."""

    def __init__(self, on_message: Callable[[str, dict], None] | None = None):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, object]] = []
        self.on_message = on_message

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if self.on_message is not None and isinstance(event, str):
            self.on_message(event, data)

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict  # executor.history_result["outputs"]: {node_id: {"images": [{filename, subfolder, type}], ...}}
    messages: list = field(default_factory=list)

    def image_files(self) -> list[tuple[str, int, str]]:
        """``(node_id, index, path)`` of every image an output node saved (SaveImage, PreviewImage ...)."""
        import folder_paths

        files = []
        for node_id, ui in self.outputs.items():
            for i, image in enumerate(ui.get("images") or []):
                folder = folder_paths.get_directory_by_type(image.get("type", "output"))
                if folder is not None:
                    files.append((node_id, i, os.path.join(folder, image.get("subfolder", ""), image["filename"])))
        return files


def _title(prompt: Mapping, node_id) -> str:
    node = prompt.get(str(node_id)) or {}
    title = (node.get("_meta") or {}).get("title")
    typ = node.get("class_type", "?")
    return f'{typ} "{title}"' if title and title != typ else typ


def format_validation_error(prompt: Mapping, error: dict, node_errors: dict) -> str:
    lines = [f"ComfyUI rejected the prompt: {error.get('message')}"]
    for node_id, info in node_errors.items():
        for reason in info.get("errors", []):
            details = f": {reason['details']}" if reason.get("details") else ""
            lines.append(f"  node {node_id} ({_title(prompt, node_id)}): {reason.get('message')}{details}")
    if not node_errors and error.get("details"):
        lines.append(f"  {error['details']}")
    return "\n".join(lines)


def format_execution_error(prompt: Mapping, data: dict) -> str:
    node_id = data.get("node_id")
    return (f"ComfyUI failed at node {node_id} ({_title(prompt, node_id)}): "
            f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")


@contextlib.contextmanager
def interrupt_on_ctrl_c(notify: Callable[[str], None] = print):
    """First Ctrl-C: ComfyUI's interrupt (the run stops at the next check); second: a plain KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import comfy.model_management

    def handler(signum, frame):
        signal.signal(signal.SIGINT, previous)
        notify("Interrupting (Ctrl-C again to abort at once) ...")
        comfy.model_management.interrupt_current_processing(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_hook(server: HeadlessServer):
    """Like main.py's ``hijack_progress``: report sampler steps and honour interrupts between them."""
    import comfy.model_management
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context()
        if node_id is None:
            node_id = context.node_id if context is not None else server.last_node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        server.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                      "prompt_id": prompt_id or server.last_prompt_id}, server.client_id)

    return hook


def release_models(executor) -> None:
    """Free what a finished run holds: its node-output cache and every model ComfyUI loaded for it, so runs in
    one process (batches, tests) do not pile up models; ComfyUI's server keeps them for the next prompt instead."""
    import gc

    import comfy.model_management

    executor.reset()  # drops the node-output cache (and the status read above)
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def output_nodes(prompt: Mapping) -> list[str]:
    """The prompt's output nodes, as ``validate_prompt`` picks them (``OUTPUT_NODE`` classes)."""
    import nodes

    return [str(i) for i, n in prompt.items()
            if getattr(nodes.NODE_CLASS_MAPPINGS.get(n.get("class_type")), "OUTPUT_NODE", False) is True]


def find_cycle(prompt: Mapping, start: str) -> list[str]:
    """Node ids of a cycle among the (linked) inputs upstream of ``start``, in order; [] when there is none."""
    path, on_path, done = [], set(), set()

    def visit(node_id: str) -> list[str]:
        if node_id in on_path:
            return path[path.index(node_id):]
        if node_id in done or node_id not in prompt:
            return []
        path.append(node_id)
        on_path.add(node_id)
        for value in (prompt[node_id].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                if found := visit(str(value[0])):
                    return found
        path.pop()
        on_path.discard(node_id)
        done.add(node_id)
        return []

    return visit(str(start))


class PromptSession:
    """One ``PromptExecutor`` for many prompts, as ComfyUI's server keeps one: checkpoint loaders and every node
    whose inputs did not change are served from its cache, so a batch of prompts loads its models once.
    :meth:`close` (or leaving the ``with`` block) releases what it holds (:func:`release_models`)."""

    def __init__(self, on_message: Callable[[str, dict], None] | None = None):
        import execution

        self.server = HeadlessServer(on_message)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        release_models(self.executor)

    def run(self, prompt: dict, workflow: Mapping | None = None) -> RunResult:
        """Validate and execute ``prompt``; return its outputs or raise :class:`RunError`."""
        import comfy.utils
        import execution

        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:  # the UI would still run the valid outputs; a batch run fails instead
            error = error or {"message": "some outputs failed validation"}
            raise RunError(format_validation_error(prompt, error, node_errors))
        dropped = sorted(set(output_nodes(prompt)) - set(map(str, outputs)), key=str)
        if dropped:  # ComfyUI drops such an output with a log line ("Output will be ignored") and no node error
            raise RunError("ComfyUI would not run output " + "; ".join(
                f"node {o} ({_title(prompt, o)})" + (f": its inputs form a cycle through nodes {', '.join(cycle)}"
                                                     if (cycle := find_cycle(prompt, o)) else "")
                for o in dropped))
        server, executor = self.server, self.executor
        server.messages, server.last_prompt_id = [], prompt_id
        executor.success, executor.history_result = True, {}
        extra_data = {"client_id": CLIENT_ID}
        if workflow is not None:
            extra_data["extra_pnginfo"] = {"workflow": workflow}
        previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
        try:
            executor.execute(prompt, prompt_id, extra_data, outputs)
        finally:
            comfy.utils.set_progress_bar_global_hook(previous_hook)
        messages, success = list(executor.status_messages), executor.success
        history = dict(getattr(executor, "history_result", None) or {})
        for event, data in messages:
            if event == "execution_error":
                raise RunError(format_execution_error(prompt, data))
            if event == "execution_interrupted":
                raise RunInterrupted(f"Interrupted at node {data.get('node_id')} "
                                     f"({_title(prompt, data.get('node_id'))})")
        if not success:
            raise RunError("ComfyUI reported failure without an error message")
        return RunResult(prompt_id, history.get("outputs", {}), server.messages)


def run_prompt(prompt: dict, workflow: Mapping | None = None,
               on_message: Callable[[str, dict], None] | None = None) -> RunResult:
    """Validate and execute ``prompt`` in a fresh :class:`PromptSession`, released afterwards; return its outputs
    or raise :class:`RunError`."""
    with PromptSession(on_message) as session:
        return session.run(prompt, workflow)
