"""Model families: which Stable Diffusion a model is, in every vocabulary that has to know.

A bank records its base model's family in ``ConceptBank.architecture`` ("sd15", "sd2", "sd2v", "sdxl";
"toy" and "tiny" for the built-in bases; anything else as the host named it). LoRA files record kohya's
``ss_base_model_version``. The command line detects the family from a diffusers pipeline, ComfyUI from
its model config class; both detectors, the kohya names and the rule for which banks fit which models
live here, so a bank trained in one host is recognised in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..method.bank import BankMismatchError

SD15, SD2, SD2V, SDXL = "sd15", "sd2", "sd2v", "sdxl"
KOHYA_BASE_VERSIONS = {SD15: "sd_v1", SD2: "sd_v2", SD2V: "sd_v2_v", SDXL: "sdxl_base_v1-0"}
# ComfyUI model config class -> family (v-prediction is read from the model, not the class)
COMFY_CONFIGS = {"SD15": SD15, "SD20": SD2, "SD21UnclipL": SD2, "SD21UnclipH": SD2, "SDXL": SDXL}
# families that share one UNet layout: a bank of one fits a model of the other
_LAYOUT = {SD2V: SD2}
SD2_CONTEXT_DIM = 1024  # OpenCLIP ViT-H text features; SD1.x has 768, SDXL 2048


def family_from_diffusers(unet_config: Mapping[str, Any], prediction_type: str = "epsilon") -> str:
    """The family of a diffusers UNet (its config) trained for ``prediction_type``.

    SDXL: the ``text_time`` added conditioning. SD2.x: cross-attention width 1024, ``sd2v`` when it
    predicts v. Everything else is labelled ``sd15`` (SD1.x and the small test models).
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("cross_attention_dim") == SD2_CONTEXT_DIM:
        return SD2V if prediction_type == "v_prediction" else SD2
    return SD15


def family_from_comfy(config_class: str, v_prediction: bool = False) -> str:
    """The family of a ComfyUI model from its model config class name (``SD15``, ``SD20``, ``SDXL``, ...)
    and whether it predicts v; an unknown class is its lower-cased name."""
    family = COMFY_CONFIGS.get(config_class, config_class.lower())
    return SD2V if family == SD2 and v_prediction else family


def kohya_base_version(architecture: str) -> str:
    """kohya's ``ss_base_model_version`` for a bank's architecture (SD1's for unknown families)."""
    return KOHYA_BASE_VERSIONS.get(architecture.lower(), KOHYA_BASE_VERSIONS[SD15])


def same_layout(a: str, b: str) -> bool:
    """True when banks of family ``a`` fit models of family ``b`` (the same family or the same UNet)."""
    a, b = a.lower(), b.lower()
    return _LAYOUT.get(a, a) == _LAYOUT.get(b, b)


def check_bank_fits(bank_architecture: str, model_architecture: str) -> None:
    """BankMismatchError when a bank of one family is applied to a model of another (unknown fits all)."""
    if bank_architecture.lower() in ("unknown", "") or same_layout(bank_architecture, model_architecture):
        return
    raise BankMismatchError(
        f"this bank was trained on {bank_architecture} but the model is {model_architecture}; load the base "
        "model the bank was trained on, or start a new bank (leave the bank input empty)"
    )
