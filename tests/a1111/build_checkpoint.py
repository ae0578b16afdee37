"""Build a random-weight checkpoint in Automatic1111's own LDM format (run with A1111's venv Python).

    python build_checkpoint.py --webui A1111_PATH --kind tiny --out tiny.safetensors
    python build_checkpoint.py --webui A1111_PATH --kind sd15 --out sd15_random.safetensors

``tiny``: the SD1.x layout at the project's tiny width (UNet channels 32/64, attention at the second
level and in the middle block, cross-attention 32; a narrow VAE that downsamples by 8 like SD's; a
5-layer CLIP text model of width 32 with the full vocabulary). A1111 reads its architecture from the
``.yaml`` written next to the checkpoint, and the text model's config and tokenizer from a
``<name>.clip`` folder next to it. ``sd15``: the full-size SD1.5 layout from A1111's
``configs/v1-inference.yaml`` (about 2 GB in fp16), which Forge detects by shape.

Every parameter gets finite random values (weights N(0, 1/fan_in), norm scales 1 +- 0.1, biases 0.02 N):
LDM zero-initialises its output projections, which would hide any LoRA on the layers before them.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "model_type": "clip_text_model",
    "architectures": ["CLIPTextModel"],
}
SD15_TEXT = {
    **TINY_TEXT,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}


def write_clip_folder(folder: Path, text_config: dict, tokenizer_dir: Path) -> Path:
    """A transformers folder with a CLIP text config and the vendored tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=1))
    (folder / "config.json").write_text(json.dumps(text_config, indent=1))
    return folder


def randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:  # norm scales and other vectors
                p.copy_(1.0 + (torch.rand(p.shape, generator=g) - 0.5) * 0.2)


def build(webui: Path, kind: str, out: Path, seed: int, tokenizer_dir: Path) -> Path:
    sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))
    import ldm.modules.encoders.modules as enc
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = OmegaConf.load(webui / "configs" / "v1-inference.yaml")
    clip_dir = write_clip_folder(out.with_suffix(".clip"), TINY_TEXT if kind == "tiny" else SD15_TEXT, tokenizer_dir)
    if kind == "tiny":
        unet = cfg.model.params.unet_config.params
        unet.model_channels = 32
        unet.channel_mult = [1, 2]
        unet.attention_resolutions = [2]
        unet.num_heads = 4
        unet.context_dim = 32
        dd = cfg.model.params.first_stage_config.params.ddconfig
        dd.ch = 32
        dd.ch_mult = [1, 2, 2, 2]  # downsampling by 8, as A1111 assumes (latent = image / 8)
        dd.num_res_blocks = 1
    cfg.model.params.cond_stage_config.params = {"version": str(clip_dir)}

    def from_config(path, *args, **kwargs):  # no weights to download: build from the folder's config
        return CLIPTextModel(CLIPTextConfig.from_pretrained(path))

    enc.CLIPTextModel.from_pretrained = from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg.model)
    randomize(model, seed)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = torch.float32 if kind == "tiny" else torch.float16
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(out)
    if kind == "tiny":
        OmegaConf.save(cfg, out.with_suffix(".yaml"))
    print(f"wrote {out} ({len(sd)} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--webui", type=Path, required=True, help="an Automatic1111 checkout (for ldm and its configs)")
    ap.add_argument("--kind", choices=("tiny", "sd15"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer", type=Path, required=True, help="the project's vendored CLIP tokenizer folder (tokenizer_assets)"
    )
    args = ap.parse_args()
    build(args.webui.resolve(), args.kind, args.out.resolve(), args.seed, args.tokenizer.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
