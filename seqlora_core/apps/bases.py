"""The bases a command can name, resolved in one place.

``toy`` (the embedded toy world), ``tiny`` (random weights, for tests), a local diffusers folder or a
single-file ``.safetensors`` checkpoint. :func:`architecture_of` names the family a bank records for
the loaded base (the built-in names, else the family detected from the pipeline).
"""

from __future__ import annotations

from typing import Any

import torch

from ..interop.families import family_from_diffusers

TOY, TINY = "toy", "tiny"
BUILTIN = (TOY, TINY)
BASES_HELP = "'toy' (the embedded toy world), 'tiny' (random, for tests), a diffusers folder or a .safetensors file"


def load_base(
    base: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
) -> Any:
    """The pipeline ``base`` names, frozen and in eval mode, on ``device``; nothing is ever downloaded.

    ``config`` (single files only): a local diffusers folder of the same architecture (see
    ``load_pipeline``). ``allow_pickle``: read a diffusers folder whose weights are pickle files.
    """
    from ..backends import diffusers_backend as db

    if base == TOY:
        from ..toy.model import load_toy_pipeline

        pipe = load_toy_pipeline(**({"dtype": dtype} if dtype is not None else {}))
    elif base == TINY:
        from ..backends.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        return db.load_pipeline(base, dtype, device, config, allow_pickle)
    return db.ready_for_training(pipe, device)


def architecture_of(base: str, pipe: Any) -> str:
    """The family a bank trained on this base records: ``toy``/``tiny``, or ``sd15``/``sd2``/``sd2v``/``sdxl``."""
    if base in BUILTIN:
        return base
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    return family_from_diffusers(pipe.unet.config, prediction)
