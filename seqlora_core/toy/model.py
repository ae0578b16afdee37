"""The toy text-to-image model: a tiny, standard diffusers ``StableDiffusionPipeline``.

32x32 RGB images, a 2x AutoencoderKL (16x16x4 latents), a UNet with widths 32/128/128 and cross-attention
at 8x8 and 4x4, a 3-layer CLIP text encoder 256 wide (so cross-attention keys and values, which read it,
have room for many rank-4 concepts beside the base's own prompts) and a word-level CLIP tokenizer whose
vocabulary is the scene words plus ``N_TRIGGERS`` reserved trigger words (``zqaa``, ``zqab``, ...) that
pretraining never shows. Prompts are at most ``MAX_LENGTH`` tokens (the scene prompts need under 20).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .concepts import N_TRIGGERS, trigger_word, trigger_words
from .scenes import RESOLUTION, vocabulary

__all__ = ["N_TRIGGERS", "load_toy_pipeline", "trigger_word", "trigger_words", "write_tokenizer"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_LENGTH = 32
HIDDEN = 256  # text encoder width = cross-attention key/value input width
WIDTHS = (32, 128, 128)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The denoising loss of pretraining, which concept training on the toy world must use too: epsilon
# prediction, min-SNR weighting (gamma 5), no offset noise.
TRAIN_LOSS = {"prediction": "epsilon", "min_snr_gamma": 5.0, "offset_noise": 0.0}
SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def write_tokenizer(out_dir: str | Path) -> Path:
    """Write a word-level CLIP BPE tokenizer (vocab.json, merges.txt, config) for the toy model.

    Every scene word and trigger word is a single token; any other word falls back to pieces.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    chars = list(string.ascii_lowercase + string.digits) + [",", "."]
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    seen: set[tuple[str, str]] = set()
    for word in vocabulary() + trigger_words():
        # every split of every piece of the word: whatever merge fires first, the word still ends as one token
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for length in range(2, len(symbols) + 1):
            for i in range(len(symbols) - length + 1):
                piece = symbols[i : i + length]
                for k in range(1, length):
                    pair = ("".join(piece[:k]), "".join(piece[k:]))
                    if pair not in seen:
                        seen.add(pair)
                        merges.append(pair)
                add("".join(piece))
    add(BOS)
    add(EOS)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def text_config(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextConfig:
    """A 3-layer CLIP text encoder, ``HIDDEN`` wide."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def unet_config() -> dict:
    """Three levels (16x16, 8x8, 4x4 latents), widths ``WIDTHS``, cross-attention at 8x8 and 4x4."""
    return dict(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=WIDTHS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def vae_config() -> dict:
    """A 2x AutoencoderKL: 32x32x3 pixels <-> 16x16x4 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def build_toy_pipeline(tokenizer_dir: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised toy pipeline (the starting point of pretraining)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(text_config(len(vocab), vocab[BOS], vocab[EOS]))
    unet = UNet2DConditionModel(**unet_config())
    vae = AutoencoderKL(**vae_config())
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_KW),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_scheduler() -> DDPMScheduler:
    """The noise schedule used for training (same betas as the sampling scheduler)."""
    kw = {k: v for k, v in SCHEDULER_KW.items() if k not in ("set_alpha_to_one",)}
    return DDPMScheduler(**kw)


def save_toy_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path) -> None:
    """Save in the standard diffusers folder layout with fp16 safetensors."""
    pipe = pipe.to(torch.float16)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    pipe.to(torch.float32)


def load_toy_pipeline(
    weights_dir: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """Load the committed pretrained toy pipeline (no training, no network)."""
    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy weights in {path}; run `python -m seqlora_core.toy.pretrain`")
    import diffusers

    version = tuple(int(x) for x in diffusers.__version__.split(".")[:2])
    dtype_kw = {"dtype" if version >= (0, 42) else "torch_dtype": dtype}  # renamed in diffusers 0.42
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **dtype_kw,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
