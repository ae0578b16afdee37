"""What differs between Automatic1111 and Forge, in one small adapter.

Everything else in this extension uses the web UI's shared API (scripts, callbacks, ``shared.state``,
the built-in Lora network), which the two hosts have in common. The differences:

- the model: A1111 holds an LDM ``LatentDiffusion`` (``sd_model.model.diffusion_model``); Forge holds
  an engine whose UNet is ``forge_objects.unet.model.diffusion_model`` and loads it lazily;
- the Lora network's caches: A1111 keeps the applied set per layer (``network_current_names``); Forge
  caches the file's tensors (``load_lora_state_dict``) and the applied set (``current_lora_hash``, and
  ``lora_loader.loaded_hash`` on the UNet). When
  an exported file is re-written under the same name, both must forget what they applied;
- training runs on A1111's LDM model only (Forge's engine has another sampling interface).

Only this module imports the host's ``modules`` package, and only inside functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

STALE = ("seqlora-stale",)  # a layer's applied-network key that never matches a real one


def is_forge() -> bool:
    """True inside Forge (its ``modules_forge`` package exists)."""
    if "modules_forge" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def host_name() -> str:
    return "Forge" if is_forge() else "Automatic1111"


def banks_dir() -> Path:
    """``--seqlora-dir`` or ``<models>/seqlora``."""
    from modules import paths, shared

    folder = getattr(shared.cmd_opts, "seqlora_dir", None)
    return Path(folder) if folder else Path(paths.models_path) / "seqlora"


def banks_dir_label() -> str:
    """The banks folder as the UI shows it: relative to the web UI's data folder when inside it."""
    from modules import paths

    folder = banks_dir()
    try:
        return folder.resolve().relative_to(Path(paths.data_path).resolve()).as_posix()
    except ValueError:
        return str(folder)


def lora_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.lora_dir)


def networks_module() -> Any:
    """The built-in Lora extension's ``networks`` module; RuntimeError when that extension is off."""
    mod = sys.modules.get("networks")
    if mod is None or not hasattr(mod, "list_available_networks"):
        raise RuntimeError("the built-in Lora extension is not loaded; enable it under Extensions -> Installed")
    return mod


def refresh_networks() -> None:
    networks_module().list_available_networks()


def sd_model(load: bool = True) -> Any:
    """The loaded checkpoint's model (loading it when needed); RuntimeError when there is none."""
    from modules import shared

    model = shared.sd_model
    if is_forge() and not hasattr(model, "forge_objects") and load:
        from modules import sd_models

        sd_models.forge_model_reload()
        model = shared.sd_model
    if model is None or (is_forge() and not hasattr(model, "forge_objects")):
        raise RuntimeError("no checkpoint is loaded; choose one in the checkpoint list first")
    return model


def diffusion_model(model: Any | None = None) -> Any:
    """The UNet whose module names are the LDM names banks trained here use."""
    model = model or sd_model()
    if hasattr(model, "forge_objects"):
        return model.forge_objects.unet.model.diffusion_model
    return model.model.diffusion_model


def architecture(model: Any | None = None) -> str:
    """The loaded model's family in the bank vocabulary: "sd15", "sd2", "sd2v", "sdxl" (or "unknown")."""
    model = model or sd_model()
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2v" if getattr(model, "parameterization", "eps") == "v" else "sd2"
    if getattr(model, "is_sd1", False):
        return "sd15"
    return "unknown"


def forget_applied_networks() -> None:
    """Make the host re-read and re-apply LoRA files on the next generation (after a re-export)."""
    net = networks_module()
    if is_forge():
        cache = getattr(net, "load_lora_state_dict", None)
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
        from modules import shared

        model = shared.sd_model
        if hasattr(model, "current_lora_hash"):
            model.current_lora_hash = "seqlora-stale"
        loader = getattr(
            getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None), "lora_loader", None
        )
        if loader is not None:
            loader.loaded_hash = "seqlora-stale"
        return
    from modules import shared

    mapping = getattr(shared.sd_model, "network_layer_mapping", None) or {}
    for module in mapping.values():
        if getattr(module, "network_current_names", ()):
            module.network_current_names = STALE


def clean_base_for_training() -> None:
    """Take every applied LoRA out of A1111's weights, so training sees the checkpoint as loaded."""
    net = networks_module()
    net.loaded_networks.clear()
    from modules import shared

    mapping = getattr(shared.sd_model, "network_layer_mapping", None) or {}
    for module in mapping.values():
        if getattr(module, "network_current_names", ()):
            net.network_restore_weights_from_backup(module)
            module.network_current_names = ()


def training_unsupported_reason(model: Any) -> str | None:
    """Why training cannot run on the loaded model here (None when it can)."""
    if hasattr(model, "forge_objects"):
        return (
            "training inside Forge is not supported yet (its engine has no LDM training interface); "
            "train the concept in Automatic1111 or with `python -m seqlora_core train`, then put the bank "
            "in this banks folder: composing, exporting and importing work here"
        )
    if getattr(model, "is_sdxl", False):
        return (
            "training an SDXL checkpoint in the web UI is not supported yet (its size and time "
            "conditioning are not handled); train SDXL concepts with `python -m seqlora_core train`; "
            "the bank composes here"
        )
    if getattr(model, "is_sd3", False):
        return "SD3 checkpoints are not supported; SeqLoRA trains SD1.x and SD2.x here"
    for attr in ("apply_model", "get_learned_conditioning", "encode_first_stage", "alphas_cumprod"):
        if not hasattr(model, attr):
            return f"the loaded model has no {attr!r}; SeqLoRA trains SD1.x and SD2.x LDM checkpoints here"
    return None


def queue_lock() -> Any:
    from modules import call_queue

    return call_queue.queue_lock


def state() -> Any:
    from modules import shared

    return shared.state


def export_dtype() -> str:
    """The "Precision of exported concept files" setting (fp32 by default: composition is then exact)."""
    try:
        from modules import shared

        value = getattr(shared.opts, "seqlora_export_dtype", "fp32")
    except ImportError:
        return "fp32"
    return value if value in ("fp32", "fp16", "bf16") else "fp32"
