"""Interoperability with the LoRA ecosystem: module names (diffusers <-> LDM <-> kohya), LoRA files
(:mod:`.lora_write`, :mod:`.lora_read`), a bank's concepts as LoRA files and back (:mod:`.bank_lora`),
and model families in every host's vocabulary (:mod:`.families`). Torch and safetensors only.
"""
