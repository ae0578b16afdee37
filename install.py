"""Run by Automatic1111/Forge (and ComfyUI-Manager) when the extension is installed or the web UI starts.

It installs nothing: the web UI's own packages (torch, safetensors, numpy, Pillow) are all the extension
needs there, and ``requirements.txt`` (for ComfyUI and the command line) would replace the versions of
transformers and Pillow that the web UI pins. It only says what is missing.
"""

import importlib.util
import sys

NEEDED = ("torch", "safetensors", "numpy", "PIL")

missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing:
    print(
        f"SeqLoRA: this Python lacks {', '.join(missing)}; the web UI normally brings them "
        "(install them into its venv). SeqLoRA installs nothing by itself.",
        file=sys.stderr,
    )
