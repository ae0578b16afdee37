"""ComfyUI nodes for SeqLoRA.

Inside ComfyUI (its ``comfy`` and ``folder_paths`` modules are loaded) this exports the node classes;
anywhere else the mappings are empty, so the package imports without ComfyUI. The node descriptions
in :mod:`.schema` never need ComfyUI.
"""

from __future__ import annotations

import sys

from . import schema  # noqa: F401  (plain Python, always importable)


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process (or a test that set one up)."""
    return "comfy.model_management" in sys.modules and "folder_paths" in sys.modules


NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

if in_comfyui():
    from . import bankfiles, comfy_nodes, routes, training

    bankfiles.register_folder()
    routes.register(training.server())
    NODE_CLASS_MAPPINGS.update(comfy_nodes.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
