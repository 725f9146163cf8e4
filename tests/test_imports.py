"""One import path: every module of the pack is imported as ``faithful_inpaint.<package>.<module>`` and exists once;
the layers import only the layers below them (read from the source, docs/layout.md)."""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from faithful_inpaint.devtools import host

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "patching", "nodes", "headless", "devtools", "training", "evaluation", "benchmarks")

# what each package may import from the pack (itself included); ComfyUI's own modules are checked separately
ALLOWED = {
    "kernels": {"kernels"},
    "patching": {"kernels", "patching"},
    "nodes": {"kernels", "patching", "nodes"},
    "devtools": {"kernels", "patching", "devtools"},
    "headless": {"kernels", "patching", "devtools", "headless"},
    "training": {"kernels", "patching", "devtools", "training"},
    "evaluation": {"kernels", "patching", "devtools", "headless", "evaluation"},
    "benchmarks": set(PACKAGES),
}


def pack_files():
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["faithful_inpaint"] + parts)


def imported_names(path: Path):
    """(line, absolute module name, level) of every import statement in the file, those inside functions too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module or "", node.level


def comfyui_top_level_names() -> set:
    root = host.comfyui_path()
    return {p.stem for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
            or p.name.startswith("comfy")}


def test_the_subpackages_are_not_top_level_modules():
    """Importing the pack from the repository root takes the root off sys.path, so no library finds ``kernels``,
    ``nodes``, ``training`` ... of the pack under the bare name (transformers imports a ``kernels`` it can find)."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is None or spec.origin != str(ROOT / package / "__init__.py"), (package, spec)


def test_every_module_exists_once_under_the_package_name():
    for path in pack_files():
        importlib.import_module(module_name(path))
    by_file = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        file = Path(file).resolve()
        if file == ROOT / "__init__.py" or (file.is_relative_to(ROOT) and file.parts[len(ROOT.parts)] in PACKAGES):
            by_file.setdefault(file, {})[name] = module
    assert len(by_file) == len(pack_files()) + 1
    for file, names in by_file.items():
        assert len({id(m) for m in names.values()}) == 1, f"{file} is loaded as {len(names)} modules: {sorted(names)}"
        if file == ROOT / "__init__.py":         # ComfyUI's path-derived name for the pack is the same object
            assert sys.modules["faithful_inpaint"] in names.values()
        else:
            assert list(names) == [module_name(file)], f"{file} is loaded as {sorted(names)}"


def test_one_import_style():
    """No relative imports, no top-level ``kernels`` / ``training`` ... (the repository root is not a path entry),
    and no module of the pack loaded by its file path."""
    bare = set(PACKAGES) - {"nodes"}      # a bare ``nodes`` is ComfyUI's nodes.py
    files = pack_files() + sorted((ROOT / "tests").glob("*.py")) + [ROOT / "__init__.py"]
    for path in files:
        for line, name, level in imported_names(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            assert level == 0, f"{where}: relative import"
            assert name.split(".")[0] not in bare, f"{where}: import {name} (use faithful_inpaint.{name})"
            assert not name.startswith("nodes."), f"{where}: import {name}"
        source = path.read_text()
        assert "spec_from_file_location" not in source or path.name == "test_imports.py", path


def test_layers_import_only_the_layers_below():
    comfy = comfyui_top_level_names()
    assert {"comfy", "folder_paths", "nodes", "comfy_api"} <= comfy
    for path in pack_files():
        package = path.relative_to(ROOT).parts[0]
        for line, name, _ in imported_names(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            parts = name.split(".")
            if parts[0] == "faithful_inpaint" and len(parts) > 1:
                assert parts[1] in ALLOWED[package], f"{where}: {package}/ imports {name}"
            if package == "kernels":
                assert parts[0] not in comfy, f"{where}: kernels/ imports ComfyUI's {name}"
