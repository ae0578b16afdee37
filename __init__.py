"""SeqLoRA as a ComfyUI custom-node pack (this folder goes into ComfyUI's custom_nodes).

Imports fine outside ComfyUI too: the node mappings are then empty. The method itself lives in
``seqlora_core`` and never imports ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
