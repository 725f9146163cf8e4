"""Model folders the pack reads that ComfyUI does not define, and file lookup with a clear error."""
from __future__ import annotations

import os
from typing import Iterable

from faithful_inpaint.patching.errors import NodeInputError


def register_model_folder(folder: str, extra_extensions: Iterable[str] = ()) -> None:
    """Make ``models/<folder>`` a ComfyUI model folder unless the host or another pack already did (as the packs that
    own these folders register them)."""
    import folder_paths  # ComfyUI's; imported on use, so training code can import the patching layer first

    if folder not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[folder] = ([os.path.join(folder_paths.models_dir, folder)],
                                                       set(folder_paths.supported_pt_extensions) | set(extra_extensions))


def read_model_file(path: str, node: str, input_name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a model file, read as tensors only (safetensors; other formats with torch.load's
    weights_only, which refuses any pickle that would run code). A truncated, random or malicious file is a
    NodeInputError naming the node, the input and the file."""
    import comfy.utils

    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as err:  # SafetensorError, UnpicklingError (weights_only), EOFError, zip errors ...
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise NodeInputError(node, input_name, f"cannot read {os.path.basename(path)}: {type(err).__name__}"
                             f"{': ' + detail if detail else ''} (a truncated or damaged file, not a model file, "
                             "or a pickle that is not plain tensors; nothing in it was run).") from None
    if not isinstance(sd, dict) or not sd:
        raise NodeInputError(node, input_name, f"{os.path.basename(path)} holds no tensors.")
    return sd, dict(metadata or {})


def file_names(folders: str | tuple[str, ...]) -> list[str]:
    """The files a loader lists: those of every folder in ``folders``, a name found in several listed once."""
    import folder_paths

    folders = (folders,) if isinstance(folders, str) else folders
    return sorted({name for folder in folders for name in folder_paths.get_filename_list(folder)})


def model_file_path(folders: str | tuple[str, ...], name: str, node: str, input_name: str) -> str:
    """Full path of a file the node's combo input listed (the first folder of ``folders`` that has it), or an error
    naming the node and input."""
    import folder_paths

    folders = (folders,) if isinstance(folders, str) else folders
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise NodeInputError(node, input_name, f"{name!r} is not in {' or '.join(f'models/{f}' for f in folders)}.")
