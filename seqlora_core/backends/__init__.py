"""Model backends: diffusers pipelines for the trainer (offline loading, cached latents and text
embeddings, the loss closure, sampling: :mod:`.diffusers_backend`) and the tiny random pipeline with the
vendored CLIP tokenizer (:mod:`.tiny`). ComfyUI's backend is ``nodes/`` (outside this package).
"""
