"""Convert a workflow saved by ComfyUI's UI into the API prompt its Queue button sends.

UI format (what the UI saves/exports and what ComfyUI PNGs embed under ``workflow``)::

    {"nodes": [{"id": 3, "type": "KSampler", "mode": 0, "title": "...",
                "inputs":  [{"name": "model", "type": "MODEL", "link": 1},
                            {"name": "seed", "type": "INT", "link": null, "widget": {"name": "seed"}}],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
                "widgets_values": [42, "randomize", 20, 8.0, "euler", "normal", 1.0]}],
     "links": [[1, 4, 0, 3, 0, "MODEL"], ...],     # [id, from_node, from_slot, to_node, to_slot, type]
     "groups": [...], "extra": {...}}

API format (``execution.validate_prompt`` / ``PromptExecutor.execute`` input)::

    {"3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42, ...}, "_meta": {"title": "..."}}}

The rules are those of ComfyUI's frontend (``graphToPrompt`` and its widget constructors), applied to the LIVE node
definitions (``INPUT_TYPES`` of ``nodes.NODE_CLASS_MAPPINGS``; V3 nodes expose it too):

* Widgets. Every input of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO/list) without ``forceInput`` has a
  widget, in definition order (required, then optional). ``widgets_values`` holds one value per widget, *including*
  widgets whose input is linked (the link wins), plus values of UI-only widgets the UI never sends:
  ``control_after_generate`` after an INT input named ``seed``/``noise_seed`` or with that option (unless the option
  is false), ``control_after_generate`` + ``control_filter_list`` after a COMBO with that option, and the
  ``upload`` button (value ``"image"``) after the last required input of a node with an ``image_upload`` /
  ``video_upload`` / ``animated_image_upload`` combo (LoadImage, LoadImageMask). Lists written without the UI-only
  values are accepted too; ``widgets_values`` given as a dict is read by name; a node saved without
  ``widgets_values`` gets the widgets' defaults. Any other count is an error.
* Array widget values are wrapped as ``{"__value__": [...]}`` (the executor unwraps them).
* ``Reroute`` is followed through; ``Note``/``MarkdownNote`` are dropped; a ``PrimitiveNode`` feeds its value
  (``widgets_values[0]``) to the widget inputs it is linked to; groups are ignored.
* Muted nodes (mode 2) are dropped; an input fed by one is removed, which is an error if the input is required.
* Bypassed nodes (mode 4) are dropped and pass through: a link from their output slot ``i`` continues from their
  input ``i`` if its type fits, else from the first input of exactly the wanted type, else the first compatible one;
  with no such input (or nothing linked there) the target keeps its widget value, if any.
* Anything the frontend could not have produced (node type not installed, wrong widget count, link to nowhere,
  subgraphs / group nodes) raises :class:`WorkflowError` naming the node id, type and title.
"""
from __future__ import annotations

from typing import Any, Mapping

MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
# The frontend attaches the upload button to these loaders even when the flag is missing.
KNOWN_MEDIA_LOADERS = {"LoadImage": "image", "LoadImageMask": "image", "LoadVideo": "file", "LoadAudio": "audio"}


class WorkflowError(ValueError):
    """The UI workflow cannot be converted; the message names the node."""


def describe(node: Mapping) -> str:
    """``node 3 (KSampler "My sampler")`` for error messages."""
    title = node.get("title")
    label = f'{node.get("type")} "{title}"' if title and title != node.get("type") else str(node.get("type"))
    return f"node {node.get('id')} ({label})"


def _spec(entry) -> tuple[Any, dict]:
    typ = entry[0] if isinstance(entry, (list, tuple)) else entry
    opts = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
    return (typ if isinstance(typ, (list, tuple)) else str(typ)), opts


def _is_combo(typ) -> bool:
    return isinstance(typ, (list, tuple)) or typ == "COMBO"


def widget_slots(class_type: str, node_class) -> list[tuple[str, bool]]:
    """The widgets the UI creates for a node, in ``widgets_values`` order: ``(name, sent_to_backend)``."""
    spec = node_class.INPUT_TYPES()
    required, optional = spec.get("required") or {}, spec.get("optional") or {}
    slots: list[tuple[str, bool]] = []
    for section in (required, optional):
        for name, entry in section.items():
            typ, opts = _spec(entry)
            if opts.get("forceInput") or not (_is_combo(typ) or typ in WIDGET_TYPES):
                continue
            slots.append((name, True))
            control = opts.get("control_after_generate")
            if typ == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                slots.append(("control_after_generate", False))
            elif _is_combo(typ) and control:
                slots.append(("control_after_generate", False))
                if not opts.get("multi_select"):
                    slots.append(("control_filter_list", False))
        if section is required:
            media = [n for n, e in required.items() if _is_combo(_spec(e)[0])
                     and any(_spec(e)[1].get(o) is True for o in MEDIA_UPLOAD_OPTIONS)]
            fallback = KNOWN_MEDIA_LOADERS.get(class_type)
            if media or (fallback in required and _is_combo(_spec(required[fallback])[0])):
                slots.append(("upload", False))
    return slots


def _default(node_class, name):
    spec = node_class.INPUT_TYPES()
    typ, opts = _spec({**(spec.get("optional") or {}), **(spec.get("required") or {})}[name])
    if "default" in opts:
        return opts["default"]
    if _is_combo(typ):
        options = typ if isinstance(typ, (list, tuple)) else opts.get("options") or [None]
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def widget_inputs(node: Mapping, node_class) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` to input names (see the module docstring)."""
    values = node.get("widgets_values")
    slots = widget_slots(node["type"], node_class)
    sent = [name for name, is_sent in slots if is_sent]
    if values is None:  # never saved: the UI would use the widgets' defaults
        return {name: _default(node_class, name) for name in sent}
    if isinstance(values, dict):
        return {name: values[name] for name in sent if name in values}
    if len(values) == len(slots):
        return {name: value for (name, is_sent), value in zip(slots, values) if is_sent}
    if len(values) == len(sent):
        return dict(zip(sent, values))
    raise WorkflowError(
        f"{describe(node)}: {len(values)} widget values {values!r}, but {node['type']} as installed has "
        f"{len(slots)} widgets ({', '.join(n for n, _ in slots) or 'none'}). The workflow was saved with a different "
        "version of this node; open and re-save it in the UI."
    )


class _Removed:
    """A link whose source is muted: the frontend drops the input altogether."""

    def __init__(self, node):
        self.node = node


class _Value:
    """A link that resolves to a literal value (a PrimitiveNode)."""

    def __init__(self, value):
        self.value = value


def _compatible(a, b) -> bool:
    """LiteGraph.isValidConnection: '*' / '' match anything; 'A,B' unions match any member."""
    a, b = ("" if a in ("*", None, 0) else str(a)), ("" if b in ("*", None, 0) else str(b))
    if not a or not b or a == b:
        return True
    return bool(set(a.lower().split(",")) & set(b.lower().split(",")))


class _Graph:
    def __init__(self, workflow: Mapping):
        if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
            raise WorkflowError("not a ComfyUI UI workflow: no 'nodes' list")
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, Mapping):  # schema version 1 writes links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = link

    def resolve_link(self, link_id, want_type, target: Mapping, visited: set):
        """Follow a link to a real node: ``[node_id, slot]``, a :class:`_Value`, a :class:`_Removed` or None."""
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"{describe(target)}: an input uses link {link_id}, which is not in the workflow")
        origin = self.nodes.get(str(link[1]))
        if origin is None:
            raise WorkflowError(f"{describe(target)}: link {link_id} comes from node {link[1]}, which does not exist")
        return self.resolve_output(origin, link[2], want_type, visited)

    def resolve_output(self, node: Mapping, slot: int, want_type, visited: set):
        key = (str(node["id"]), slot)
        if key in visited:
            raise WorkflowError(f"{describe(node)}: links form a loop through this node")
        visited.add(key)
        inputs = node.get("inputs") or []
        if node["type"] == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return _Value(values[0]) if values else None
        if node.get("mode") == BYPASSED:
            index = self._bypass_input(node, slot, want_type)
            if index < 0 or inputs[index].get("link") is None:
                return None
            return self.resolve_link(inputs[index]["link"], inputs[index].get("type"), node, visited)
        if node["type"] == "Reroute":
            if not inputs or inputs[0].get("link") is None:
                return None
            return self.resolve_link(inputs[0]["link"], want_type, node, visited)
        if node["type"] in NOTE_TYPES:
            return None
        if node.get("mode") == MUTED:
            return _Removed(node)
        return [str(node["id"]), int(slot)]

    @staticmethod
    def _bypass_input(node: Mapping, slot: int, want_type) -> int:
        """ExecutableNodeDTO#getBypassSlotIndex of the frontend."""
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want_type in ("*", ""):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if slot < len(inputs) and _compatible(inputs[slot].get("type"), out_type) and \
                _compatible(inputs[slot].get("type"), want_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _compatible(inp.get("type"), out_type) and _compatible(inp.get("type"), want_type):
                return i
        return -1


def convert(workflow: Mapping, node_classes: Mapping[str, type] | None = None) -> dict:
    """Return the API prompt for a UI workflow (see the module docstring for the rules)."""
    if node_classes is None:
        import nodes  # ComfyUI's live registry (built-in nodes + loaded custom nodes)

        node_classes = nodes.NODE_CLASS_MAPPINGS
    graph = _Graph(workflow)
    subgraphs = {s.get("id") for s in ((workflow.get("definitions") or {}).get("subgraphs") or [])}
    prompt = {}
    for node_id, node in graph.nodes.items():
        typ = node.get("type")
        if typ in NOTE_TYPES or typ in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        if typ in subgraphs:
            raise WorkflowError(f"{describe(node)} is a subgraph; subgraphs are not supported yet: unpack it in the UI")
        if isinstance(typ, str) and typ.startswith("workflow>"):
            raise WorkflowError(f"{describe(node)} is a group node; convert it back to nodes in the UI")
        node_class = node_classes.get(typ)
        if node_class is None:
            raise WorkflowError(f"{describe(node)}: node type {typ!r} is not installed in this ComfyUI")
        required = set((node_class.INPUT_TYPES().get("required") or {}).keys())
        inputs = {name: ({"__value__": value} if isinstance(value, list) else value)
                  for name, value in widget_inputs(node, node_class).items()}
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            source = graph.resolve_link(inp["link"], inp.get("type"), node, set())
            name = inp["name"]
            if isinstance(source, _Removed):
                inputs.pop(name, None)
                if name in required:
                    raise WorkflowError(f"{describe(node)}: required input '{name}' comes from "
                                        f"{describe(source.node)}, which is muted")
            elif isinstance(source, _Value):
                inputs[name] = {"__value__": source.value} if isinstance(source.value, list) else source.value
            elif source is not None:
                inputs[name] = source
            elif name in required and name not in inputs:
                raise WorkflowError(f"{describe(node)}: required input '{name}' is linked through a bypassed node or "
                                    "reroute that leads to nothing")
        prompt[node_id] = {"class_type": typ, "inputs": inputs, "_meta": {"title": node.get("title") or typ}}
    return prompt
