"""SeqLoRA inside Automatic1111 and Forge (the web UI loads ``scripts/seqlora.py``, which imports this).

| module | one job |
|---|---|
| ``_core`` | the one place that imports ``seqlora_core`` (plus the selection grammar and an alias-setting export) |
| ``selection`` | the accordion's value: ``name:strength, !off:strength``, the infotext field, ``<lora:...>`` tags |
| ``banks`` | the banks folder: safe names, listing, header summaries, cached loads, atomic saves |
| ``exports`` | concepts as LoRA files under ``<Lora>/seqlora`` with card sidecars, re-written only when stale |
| ``shapes`` | layers found and banks checked by weight shape (Forge's ``Linear`` is no ``nn.Linear``) |
| ``ldm_loss`` | the denoising loss of A1111's LDM model and step-indexed batches for the core trainer |
| ``training`` | one concept trained on the loaded checkpoint: progress, Interrupt, Resume, status |
| ``service`` | what the tab and the API share: listings, export, import, report, background training |
| ``host`` | the A1111/Forge adapter: model, Lora caches, folders, queue lock, state |
| ``accordion``, ``tab``, ``api``, ``views`` | the txt2img/img2img accordion, the tab, ``/seqlora/v1``, HTML pieces |

Nothing here imports the web UI's ``modules`` at import time, so everything but ``host`` (and the UI
builders) is testable without a web UI.
"""
