"""Model folders the pack reads that ComfyUI does not define, and file lookup with a clear error."""
from __future__ import annotations

import os
from typing import Iterable

import folder_paths

from faithful_inpaint.patching.errors import NodeInputError


def register_model_folder(folder: str, extra_extensions: Iterable[str] = ()) -> None:
    """Make ``models/<folder>`` a ComfyUI model folder unless the host or another pack already did (as the packs that
    own these folders register them)."""
    if folder not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[folder] = ([os.path.join(folder_paths.models_dir, folder)],
                                                       set(folder_paths.supported_pt_extensions) | set(extra_extensions))


def model_file_path(folder: str, name: str, node: str, input_name: str) -> str:
    """Full path of a file the node's combo input listed, or an error naming the node and input."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise NodeInputError(node, input_name, f"{name!r} is not in models/{folder}.")
    return path
