"""The vendored SD/CLIP tokenizer and a tiny random Stable Diffusion pipeline (`--base tiny`).

Nothing here reads the network or a model hub: the tokenizer files ship in `tokenizer_assets/`
and the tiny models are built from configs with seeded random weights.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer_assets"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # 48,894 merges follow the header line of the open_clip vocab file
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable unicode map (188 printable bytes first, then 256, 257, ...)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def convert_clip_bpe(gz_path: str | Path, out_dir: str | Path) -> Path:
    """Convert open_clip's `bpe_simple_vocab_16e6.txt.gz` into HF `vocab.json`/`merges.txt`/config.

    The result is the SD1.x CLIP tokenizer (49,408 tokens, 77 positions).
    """
    lines = gzip.decompress(Path(gz_path).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + N_MERGES]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, got {len(tokens)}: not the CLIP BPE vocab file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_clip_tokenizer(path: str | Path | None = None) -> Any:
    """The CLIP tokenizer from the vendored files (or `path`), as a transformers `CLIPTokenizer`.

    Uses `from_pretrained(dir)`: transformers 5 ignores `vocab_file=`/`merges_file=` keywords and
    silently builds a 2-token vocabulary.
    """
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path or TOKENIZER_DIR), local_files_only=True)
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    tok.model_max_length = 77
    return tok


def tiny_unet_config() -> dict[str, Any]:
    """UNet2DConditionModel config, 1.43 M parameters, 32x32x4 latents, cross-attention dim 32."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL config, 0.66 M parameters, downsampling factor 2 (64 px -> 32x32 latents)."""
    return dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )


def tiny_text_config() -> dict[str, Any]:
    """CLIPTextConfig kwargs, hidden 32, 5 layers, the full 49,408-token CLIP vocabulary."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> Any:
    """The SD1.x DDIM scheduler (scaled_linear betas 0.00085-0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A tiny random `StableDiffusionPipeline` (UNet 1.43 M, VAE 0.66 M, text 1.62 M), fp32, CPU.

    The weights are a deterministic function of `seed`; the global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config())
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A tiny random `StableDiffusionXLPipeline`: two text encoders (hidden 32 each, the second with
    a 32-d projection), text_time added conditioning, the tiny VAE and DDIM scheduler."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg = tiny_unet_config() | dict(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config())
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_config(), projection_dim=32))
    tok = load_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=tiny_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe
