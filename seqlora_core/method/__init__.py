"""The method: adapted layers, activation statistics, learned bases, interference, training, the bank,
composition and the report.

This layer imports torch and safetensors only (never diffusers, transformers, PIL or ComfyUI), so every
host can use it. The baselines it is compared with live in ``seqlora_core.baselines``; each method says in
:mod:`.methods` how it is trained and composed, and the engine asks the method, never its name.
"""
