"""The package's layers: no module imports a layer above its own, the method layer stays free of
diffusers, transformers, Pillow and ComfyUI, and importing ``seqlora_core`` stays light.

Imports are read from the source (module level and inside functions alike), so a lazy import upward is
caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "seqlora_core"
# lowest first; a module may import its own layer and the ones before it
LAYERS = (
    ("files",),
    ("method", "baselines"),
    ("interop",),
    ("data",),
    ("backends",),
    ("toy",),
    ("apps",),
)
TOP = len(LAYERS)  # seqlora_core/__init__.py and __main__.py: the public face, above every layer
HOST_PACKAGES = {"comfy", "comfy_extras", "folder_paths", "server", "nodes", "aiohttp"}
NOT_IN_METHOD = {"diffusers", "transformers", "PIL", "huggingface_hub", "tqdm", *HOST_PACKAGES}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "seqlora_core" or len(parts) == 1 or parts[1] in ("__main__",):
        return TOP
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS and docs/architecture.md")


def _imports(path: Path) -> list[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x
            out += [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)


def test_every_module_belongs_to_a_layer() -> None:
    for path in _modules():
        _layer(_module_name(path))


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in _modules():
        module = _module_name(path)
        own = _layer(module)
        for name in _imports(path):
            if name.startswith("seqlora_core") and _layer(name) > own:
                upward.append(f"{module} ({LAYERS[own]}) imports {name}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_method_layer_needs_neither_models_nor_hosts() -> None:
    found = []
    for path in _modules():
        module = _module_name(path)
        if _layer(module) != 1:
            continue
        found += [f"{module} imports {n}" for n in _imports(path) if n.split(".")[0] in NOT_IN_METHOD]
    assert not found, "\n".join(found)


def test_the_library_never_imports_comfyui() -> None:
    found = [
        f"{_module_name(p)} imports {n}" for p in _modules() for n in _imports(p) if n.split(".")[0] in HOST_PACKAGES
    ]
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_importing_the_library_stays_light() -> None:
    """An Automatic1111 extension imports the library where only torch, safetensors, numpy and Pillow are
    sure to exist: no diffusers or transformers may load with the package or its method and interop layers."""
    targets = "seqlora_core, seqlora_core.method.trainer, seqlora_core.interop.bank_lora, seqlora_core.data.captions"
    code = (
        f"import sys, {targets}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'comfy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {targets} loads {out.stdout.strip()}"
