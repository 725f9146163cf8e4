"""Override convention: which node inputs the runner's ``--prompt``, ``--seed``, ``--image`` ... replace.

A workflow names its override targets itself, in the UI workflow's ``extra`` (the UI keeps unknown ``extra`` keys
when it saves)::

    "extra": {"faithful_inpaint": {
        "overrides": {
            "prompt":   [[6, "text"]],           # --prompt TEXT
            "negative": [[7, "text"]],           # --negative TEXT
            "seed":     [[3, "seed"]],           # --seed N
            "steps":    [[3, "steps"]],          # --steps N
            "image":    [[10, "image"]],         # --image PATH  (a LoadImage)
            "mask":     [[11, "image"]],         # --mask PATH   (a LoadImageMask, or a LoadImage whose MASK is used)
            "subject":  [[12, "image"]],         # --subject PATH (a LoadImage: the image prompt's subject)
            "ckpt":     [[4, "ckpt_name"]],      # --ckpt FILE|NAME
            "branch":   [[13, "branch_name"]]    # --branch FILE|NAME (a BrushBranchLoader, models/inpaint)
        },
        "smoke": {"ckpt": "sd15_inpaint", "image_size": [256, 256], "steps": 2}
    }}

* A target is ``[node_id, input_name]``: the node id of the UI workflow and an input name of that node's type.
  A key may list several targets: one value feeds them all, or give exactly one value per target (in order).
* The value replaces whatever the converted prompt had there (a widget value or a link).
* A target node must survive conversion (not muted, bypassed, a Reroute, PrimitiveNode or Note).
* Asking for an override the workflow does not declare is an error (the runner never guesses targets).
* ``smoke`` (used by ``--smoke``): a value that is a smoke model kind (``devtools.smoke_checkpoints.KINDS``)
  generates that random-weight file and feeds its name to the targets of the same key (a list of kinds feeds one
  kind to each target, in order: ``"ckpt": ["sd15_inpaint", "sd_x4_upscaler"]``); ``image_size`` [w, h] sets
  the generated test image; any other key is a default value for that override in smoke runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

EXTRA_KEY = "faithful_inpaint"


class OverrideError(ValueError):
    pass


def pack_extra(workflow: Mapping) -> dict:
    return dict(((workflow.get("extra") or {}).get(EXTRA_KEY)) or {})


def declared_targets(workflow: Mapping) -> dict[str, list[tuple[str, str]]]:
    """``{key: [(node_id, input_name), ...]}`` from ``extra.faithful_inpaint.overrides``."""
    raw = pack_extra(workflow).get("overrides") or {}
    if not isinstance(raw, Mapping):
        raise OverrideError(f"extra.{EXTRA_KEY}.overrides must be a dict of key -> [[node_id, input_name], ...]")
    out = {}
    for key, targets in raw.items():
        if not isinstance(targets, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in targets):
            raise OverrideError(f"extra.{EXTRA_KEY}.overrides.{key} must be a list of [node_id, input_name] pairs, "
                                f"got {targets!r}")
        out[key] = [(str(node_id), str(name)) for node_id, name in targets]
    return out


def apply_overrides(prompt: dict, workflow: Mapping, values: Mapping[str, Sequence[Any]],
                    node_classes: Mapping[str, type] | None = None) -> None:
    """Write ``values`` ({key: [value, ...]}) into the targets the workflow declares for each key."""
    if node_classes is None:
        import nodes

        node_classes = nodes.NODE_CLASS_MAPPINGS
    declared = declared_targets(workflow)
    for key, vals in values.items():
        targets = declared.get(key)
        if not targets:
            raise OverrideError(
                f"--{key} was given, but the workflow declares no '{key}' target: add "
                f'"extra": {{"{EXTRA_KEY}": {{"overrides": {{"{key}": [[NODE_ID, "INPUT_NAME"]]}}}}}} to it')
        if len(vals) not in (1, len(targets)):
            raise OverrideError(f"--{key}: {len(vals)} values for {len(targets)} declared targets; give 1 or "
                                f"{len(targets)}")
        for i, (node_id, name) in enumerate(targets):
            node = prompt.get(node_id)
            if node is None:
                raise OverrideError(f"'{key}' override target node {node_id} is not in the prompt (no such node, or "
                                    "it is muted, bypassed, or a UI-only node)")
            spec = node_classes[node["class_type"]].INPUT_TYPES()
            if name not in (spec.get("required") or {}) and name not in (spec.get("optional") or {}):
                raise OverrideError(f"'{key}' override target: node {node_id} ({node['class_type']}) has no input "
                                    f"'{name}'")
            value = vals[0] if len(vals) == 1 else vals[i]
            node["inputs"][name] = {"__value__": value} if isinstance(value, list) else value
