"""Deterministic CPU pretraining of the toy model.

``python -m seqlora_core.toy.pretrain --out seqlora_core/toy/weights``

1. VAE (2x AutoencoderKL) on rendered scenes, random colour mosaics and random blocky glyphs in any
   colour (a generic codec, so that new concepts' glyphs survive it).
2. UNet + text encoder jointly on the scenes' latents, with 10% empty prompts (for guidance), the
   denoising loss concept training uses too (``TRAIN_LOSS``: epsilon prediction, min-SNR weighting, no
   offset noise) and an exponential moving average of the weights.
3. Reserved trigger words get random embeddings with the norm of the trained words, so new words
   stay distinct for the text encoder while it never saw them.
4. Checks: prompt following on held-out (colour, shape) pairs, and the room the base leaves per adapted
   layer (how many input directions hold 99% / 99.9% of the trigger-free prompts' activation energy);
   results go to ``pretrain_info.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .identity import SmallCNN, augment, fit, to_input
from .model import (
    N_TRIGGERS,
    TRAIN_LOSS,
    build_toy_pipeline,
    save_toy_pipeline,
    train_scheduler,
    trigger_word,
    trigger_words,
    write_tokenizer,
)
from .scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    RESOLUTION,
    SHAPES,
    Scene,
    SceneObject,
    render_scene,
    scene_dataset,
    scene_prompt,
    vocabulary,
)

INFO_FILE = "pretrain_info.json"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def mosaics(n: int, seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """Random colour grids in random rectangles: generic VAE training data."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i in range(n):
        img = np.full((resolution, resolution, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        cells = int(rng.integers(2, 9))
        side = int(rng.integers(8, resolution + 1))
        x0, y0 = rng.integers(0, resolution - side + 1, 2)
        grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        idx = np.arange(side) * cells // side
        img[y0 : y0 + side, x0 : x0 + side] = grid[idx][:, idx]
        out[i] = img
    return out


def pixel_glyphs(n: int, seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """Random blocky glyphs in 2-3 random colours on plain backgrounds: generic VAE training data."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i in range(n):
        img = np.full((resolution, resolution, 3), rng.choice([20, 120, 235]) + rng.integers(-12, 13), np.int32)
        cells = int(rng.integers(3, 7))
        side = int(rng.integers(10, 22))
        x0, y0 = rng.integers(0, resolution - side + 1, 2)
        colours = rng.integers(0, 256, (3, 3))
        grid = np.where((rng.random((cells, cells)) < 0.6)[..., None], colours[rng.integers(0, 3, (cells, cells))], -1)
        idx = np.arange(side) * cells // side
        block = grid[idx][:, idx]
        region = img[y0 : y0 + side, x0 : x0 + side]
        img[y0 : y0 + side, x0 : x0 + side] = np.where(block >= 0, block, region)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def train_vae(vae: torch.nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """Reconstruction (MSE) + a small KL term; returns the final reconstruction PSNR."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, 50)
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        x = data[:256]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss(rec, x).item()
    return 10 * math.log10(4.0 / mse)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, data: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of all images (unscaled)."""
    return torch.cat([vae.encode(data[i : i + batch]).latent_dist.mean for i in range(0, len(data), batch)])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


@torch.no_grad()
def set_trigger_embeddings(pipe, norm: float, seed: int) -> torch.Tensor:
    """Give every reserved trigger word a fixed random embedding of the given norm; returns the rows' ids."""
    emb = pipe.text_encoder.get_input_embeddings().weight
    vocab = pipe.tokenizer.get_vocab()
    rows = torch.tensor([vocab[w + "</w>"] for w in trigger_words()])
    new = torch.randn(len(rows), emb.shape[1], generator=torch.Generator().manual_seed(seed))
    emb[rows] = new / new.norm(dim=1, keepdim=True) * norm
    return rows


def trigger_separation_loss(te, tok, rows: torch.Tensor, gen: torch.Generator, n: int = 16) -> torch.Tensor:
    """Mean squared cosine between text-encoder outputs at the positions of n different trigger words.

    Images never enter: this only teaches the text encoder to keep unseen words apart, so that a new
    concept's trigger gives the UNet a feature of its own.
    """
    pick = rows[torch.randperm(len(rows), generator=gen)[:n]]
    words = tok.convert_ids_to_tokens(pick.tolist())
    templates = [
        "a photo of {}",
        "{} on the left",
        "a photo of {} at the top",
        "{} in the center, white background",
        "a {} on the right",
        "a photo of {}, black background",
    ]
    order = torch.randint(0, len(templates), (n,), generator=gen).tolist()
    prompts = [templates[k].format(w.removesuffix("</w>")) for k, w in zip(order, words, strict=True)]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    where = ids == pick[:, None]
    if not bool((where.sum(1) == 1).all()):
        raise ValueError("every trigger word must be exactly one token of its prompt")
    h = te(ids)[0][where]  # one row per prompt: the trigger's position
    z = F.normalize(h, dim=1)
    cos = z @ z.T
    return cos[~torch.eye(n, dtype=torch.bool)].pow(2).mean()


def train_denoiser(
    pipe,
    latents: torch.Tensor,
    prompts: list[str],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    p_uncond: float = 0.1,
    ema_decay: float = 0.995,
    trigger_norm: float = 0.25,
    trigger_weight: float = 0.05,
) -> list[float]:
    """Train UNet and text encoder together; the pipeline ends up holding the EMA weights.

    The loss is ``TRAIN_LOSS``'s (min-SNR weighting speeds up learning of layout and shape); concept
    training on the toy world uses the same one.
    Trigger-word embeddings stay fixed (random, ``trigger_norm``); ``trigger_weight`` scales
    ``trigger_separation_loss``.
    """
    gen = torch.Generator().manual_seed(seed)
    tok = pipe.tokenizer
    rows = set_trigger_embeddings(pipe, trigger_norm, seed)
    emb = pipe.text_encoder.get_input_embeddings().weight
    fixed = emb.detach()[rows].clone()
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    sched = train_scheduler()
    acp = sched.alphas_cumprod
    unet, te = pipe.unet, pipe.text_encoder
    unet.train()
    te.train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    losses: list[float] = []
    seps: list[float] = []
    bar = tqdm(range(steps), desc="unet+text", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, 200)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        b_ids = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < p_uncond
        b_ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(acp), (batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = te(b_ids)[0]
        pred = unet(xt, t, cond).sample
        snr = a / (1 - a)
        weight = snr.clamp(max=TRAIN_LOSS["min_snr_gamma"]) / snr
        loss = (weight * (pred - noise).pow(2)).mean()
        sep = trigger_separation_loss(te, tok, rows, gen) if trigger_weight else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + trigger_weight * sep).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            emb[rows] = fixed
        seps.append(sep.item())
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, te, decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", sep=f"{np.mean(seps[-50:]):.3f}")
    unet.load_state_dict(ema_unet.state_dict())
    te.load_state_dict(ema_te.state_dict())
    unet.eval()
    te.eval()
    return losses


@torch.no_grad()
def trigger_distinctness(pipe, n: int = 20) -> dict[str, float]:
    """Cosine of text-encoder outputs at the trigger position, between different triggers."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    words = trigger_words()[:n]
    ids = tok(
        [f"a photo of {w}" for w in words], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    out = te(ids)[0][:, 4]  # bos a photo of <trigger>
    out = F.normalize(out, dim=1)
    cos = out @ out.T
    off = cos[~torch.eye(n, dtype=torch.bool)]
    ref = tok(
        ["a photo of a red circle", "a photo of a blue square"],
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    r = F.normalize(te(ref)[0][:, 5], dim=1)
    return {
        "trigger_cos_mean": float(off.mean()),
        "trigger_cos_max": float(off.max()),
        "red_circle_vs_blue_square_cos": float(r[0] @ r[1]),
    }


def attribute_scenes(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """Single solid objects over all (colour, shape, position) triples, random size and background."""
    rng = random.Random(seed)
    scenes = [
        Scene(
            (
                SceneObject(
                    rng.choice(SHAPES),
                    rng.choice(list(COLOURS)),
                    rng.choice(list(POSITIONS)),
                    rng.choice([None, "small", "big"]),
                ),
            ),
            rng.choice(list(BACKGROUNDS)),
        )
        for _ in range(n)
    ]
    images = np.stack([np.asarray(render_scene(s, seed=rng.randrange(1 << 30))) for s in scenes])
    return images, scenes


def attribute_labels(scenes: list[Scene]) -> list[torch.Tensor]:
    """Colour, shape and position indices of each scene's (first) object."""
    objs = [s.objects[0] for s in scenes]
    return [
        torch.tensor([list(COLOURS).index(o.colour) for o in objs]),
        torch.tensor([SHAPES.index(o.shape) for o in objs]),
        torch.tensor([list(POSITIONS).index(o.position) for o in objs]),
    ]


def train_attribute_probe(seed: int, n: int = 8000, epochs: int = 10) -> tuple[SmallCNN, list[float]]:
    """A CNN reading colour, shape and position off renderings; returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    images, scenes = attribute_scenes(n, seed)
    x = to_input(np.stack([augment(Image.fromarray(im), rng) for im in images]))
    probe = SmallCNN([len(COLOURS), len(SHAPES), len(POSITIONS)])
    fit(probe, x, attribute_labels(scenes), epochs, seed)
    test_images, test_scenes = attribute_scenes(600, seed + 1)
    with torch.no_grad():
        outs = probe(to_input(test_images))
    acc = [float((o.argmax(-1) == y).float().mean()) for o, y in zip(outs, attribute_labels(test_scenes), strict=True)]
    return probe, acc


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0, batch: int = 32
) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1]; one seeded generator per prompt."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out.append(
            pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images
        )
    return torch.cat(out)


def prompt_following(weights_dir: Path, seed: int = 0, n_seeds: int = 2) -> dict:
    """Colour/shape/position accuracy of generated images for held-out and seen (colour, shape) pairs."""
    from .model import load_toy_pipeline

    probe, probe_acc = train_attribute_probe(seed)
    pipe = load_toy_pipeline(weights_dir)
    rng = random.Random(seed)
    seen = rng.sample(sorted({(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT), len(HELD_OUT))
    result: dict = {
        "probe_accuracy_on_renders": dict(zip(["colour", "shape", "position"], probe_acc, strict=True)),
        "chance": {
            "colour": 1 / len(COLOURS),
            "shape": 1 / len(SHAPES),
            "position": 1 / len(POSITIONS),
            "all_three": 1 / (len(COLOURS) * len(SHAPES) * len(POSITIONS)),
        },
    }
    for name, pairs in (("held_out_pairs", sorted(HELD_OUT)), ("seen_pairs", seen)):
        objs = [SceneObject(s, c, p) for c, s in pairs for p in POSITIONS for _ in range(n_seeds)]
        prompts = [scene_prompt(Scene((o,), "white")) for o in objs]
        images = generate(pipe, prompts, seed + 1000)
        with torch.no_grad():
            preds = [o.argmax(-1) for o in probe(to_input(images))]
        labels = attribute_labels([Scene((o,), "white") for o in objs])
        hits = [p == y for p, y in zip(preds, labels, strict=True)]
        result[name] = {
            "n": len(prompts),
            "colour": float(hits[0].float().mean()),
            "shape": float(hits[1].float().mean()),
            "position": float(hits[2].float().mean()),
            "all_three": float((hits[0] & hits[1] & hits[2]).float().mean()),
        }
        save_grid(images, weights_dir / f"samples_{name}.png", cols=len(POSITIONS) * n_seeds)
    return result


def save_grid(images: torch.Tensor, path: Path, cols: int, scale: int = 2) -> None:
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid."""
    x = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate(list(x[i : i + cols]), axis=1) for i in range(0, len(x), cols)]
    rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def attention_params(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights of every attention projection (to_q, to_k, to_v, to_out.0) of the UNet."""
    keys = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")
    return [p for n, p in unet.named_parameters() if any(k in n for k in keys)]


def concept_finetune_check(
    weights_dir: Path,
    concept_id: int = 0,
    steps: int = 200,
    batch: int = 4,
    lr: float = 1e-3,
    n_images: int = 8,
    seed: int = 0,
    n_eval: int = 20,
    lora_rank: int | None = None,
) -> dict:
    """Fine-tune the UNet attention projections on one concept (plainly, or a peft LoRA of
    ``lora_rank``); identity of generated images before and after."""
    from .concepts import concept_examples
    from .identity import identity_accuracy, identity_scores
    from .model import load_toy_pipeline

    torch.manual_seed(seed)
    pipe = load_toy_pipeline(weights_dir)
    examples = concept_examples(concept_id, n_images, seed)
    word = trigger_word(concept_id)
    tok, vae, unet = pipe.tokenizer, pipe.vae, pipe.unet
    with torch.no_grad():
        x = to_tensor(np.stack([np.asarray(im) for im, _ in examples]))
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ids = tok(
            [c for _, c in examples], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        cond = pipe.text_encoder(ids)[0]
    eval_prompts = [f"a photo of {word}"] * (n_eval // 2) + [f"{word} in the center"] * (n_eval - n_eval // 2)

    def measure() -> dict:
        images = generate(pipe, eval_prompts, seed + 500)
        return {
            "identity_accuracy": identity_accuracy(images, concept_id),
            "identity_mean_prob": float(identity_scores(images, concept_id).mean()),
        }, images

    before, _ = measure()
    unet.requires_grad_(False)
    if lora_rank:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        params = [p for n, p in unet.named_parameters() if "lora" in n]
    else:
        params = attention_params(unet)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp = train_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    times, losses = [], []
    for _ in tqdm(range(steps), desc=f"finetune {word}", mininterval=10):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(lat), (batch,), generator=gen)
        noise = torch.randn(lat[idx].shape, generator=gen)
        t = torch.randint(0, len(acp), (batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * lat[idx] + (1 - a).sqrt() * noise, t, cond[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    unet.eval()
    after, images = measure()
    save_grid(images, weights_dir / f"samples_finetuned_concept_{'lora' if lora_rank else 'attn'}.png", cols=10)
    return {
        "concept_id": concept_id,
        "lora_rank": lora_rank,
        "trigger": word,
        "trigger_tokens": tok.tokenize(word),
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "step_seconds_median": float(np.median(times)),
        "loss_first_20": float(np.mean(losses[:20])),
        "loss_last_20": float(np.mean(losses[-20:])),
        "before": before,
        "after": after,
    }


def machine() -> str:
    """A short description of the CPU this ran on."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def pretrain(out: Path, n_scenes: int, vae_steps: int, unet_steps: int, batch: int, seed: int) -> dict:
    """Run stages 1-3 and save the pipeline; returns the info dict."""
    t0 = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tok_dir = write_tokenizer(out / "tokenizer")
    pipe = build_toy_pipeline(tok_dir, seed=seed)
    images, prompts, _ = scene_dataset(n_scenes, seed=seed)
    data = to_tensor(images)
    vae_data = torch.cat(
        [data, to_tensor(mosaics(n_scenes // 3, seed + 1)), to_tensor(pixel_glyphs(n_scenes // 2, seed + 3))]
    )
    print(f"[{time.time() - t0:.0f}s] rendered {len(images)} scenes")
    psnr = train_vae(pipe.vae, vae_data, vae_steps, batch, 1e-3, seed)
    print(f"[{time.time() - t0:.0f}s] vae psnr {psnr:.1f} dB")
    pipe.vae.requires_grad_(False)
    raw = encode_latents(pipe.vae, data)
    scale = float(1.0 / raw.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    t_vae = time.time() - t0
    losses = train_denoiser(pipe, raw * scale, prompts, unet_steps, batch, 8e-4, seed)
    print(f"[{time.time() - t0:.0f}s] denoiser loss {np.mean(losses[-200:]):.4f}")
    emb = pipe.text_encoder.get_input_embeddings().weight
    vocab = pipe.tokenizer.get_vocab()
    word_norm = float(emb.detach()[[vocab[w + "</w>"] for w in vocabulary()]].norm(dim=1).mean())
    save_toy_pipeline(pipe, out)
    elapsed = time.time() - t0
    info = {
        "seed": seed,
        "scenes": n_scenes,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "batch": batch,
        "vae_psnr_db": round(psnr, 2),
        "latent_scaling_factor": scale,
        "final_loss": float(np.mean(losses[-200:])),
        "loss_first_200": float(np.mean(losses[:200])),
        "vae_seconds": round(t_vae),
        "total_seconds": round(elapsed),
        "machine": machine(),
        "widths": list(pipe.unet.config.block_out_channels),
        "text_width": pipe.text_encoder.config.hidden_size,
        "train_loss": dict(TRAIN_LOSS),
        "n_triggers": N_TRIGGERS,
        "trained_word_norm": word_norm,
        **trigger_distinctness(pipe),
    }
    print(f"[{elapsed:.0f}s] saved to {out}")
    return info


@torch.no_grad()
def prior_room(
    weights_dir: Path, targets: str = "attn_ff", n_scenes: int = 256, seed: int = 0, batch: int = 32
) -> dict:
    """How full the base's adapted layers are: per layer, the number of input directions that hold 99% and
    99.9% of the activation energy of trigger-free prompts (the world's scenes, every fourth prompt empty)
    at random timesteps. What is left over is the room new concepts have."""
    from ..method.stats import MomentRecorder
    from ..method.targets import find_targets
    from .model import load_toy_pipeline

    pipe = load_toy_pipeline(weights_dir)
    unet, vae, tok = pipe.unet, pipe.vae, pipe.tokenizer
    images, prompts, _ = scene_dataset(n_scenes, seed=20_000 + seed)
    prompts = ["" if i % 4 == 3 else p for i, p in enumerate(prompts)]
    specs = find_targets(unet, targets)
    acp = train_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    with MomentRecorder(unet, specs) as rec:
        for i in range(0, n_scenes, batch):
            x = to_tensor(images[i : i + batch])
            lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            ids = tok(
                prompts[i : i + batch], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
            ).input_ids
            t = torch.randint(0, len(acp), (len(x),), generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * torch.randn(lat.shape, generator=gen)
            unet(noisy, t, pipe.text_encoder(ids)[0])
    layers = {}
    for spec, moment in zip(specs, rec.moments().values(), strict=True):
        evals = torch.linalg.eigvalsh(moment.double()).flip(0).clamp_min(0)
        cover = torch.cumsum(evals, 0) / evals.sum()
        layers[spec.name] = {
            "width": spec.in_features,
            "dirs_99": int((cover < 0.99).sum()) + 1,
            "dirs_999": int((cover < 0.999).sum()) + 1,
        }
    by_kind: dict[str, list[dict]] = {}
    for name, row in layers.items():
        kind = ".".join(name.split(".")[-2:]) if ".ff." not in name else "ff." + name.rsplit(".ff.", 1)[1]
        by_kind.setdefault(kind, []).append(row)
    summary = {
        kind: {
            "width": rows[0]["width"],
            "layers": len(rows),
            "dirs_99_median": float(np.median([r["dirs_99"] for r in rows])),
            "dirs_999_median": float(np.median([r["dirs_999"] for r in rows])),
            "dirs_999_max": max(r["dirs_999"] for r in rows),
            "free_fraction_999_median": float(np.median([1 - r["dirs_999"] / r["width"] for r in rows])),
        }
        for kind, rows in sorted(by_kind.items())
    }
    return {"targets": targets, "prompts": n_scenes, "by_kind": summary, "layers": layers}


def print_room(room: dict) -> None:
    """The room table, one row per kind of adapted layer."""
    print(
        f"room left by trigger-free prompts ({room['targets']}, {room['prompts']} prompts; directions for "
        "99% / 99.9% of the energy, median over layers):"
    )
    for kind, row in room["by_kind"].items():
        print(
            f"  {kind:<22} width {row['width']:>4}  x{row['layers']:<3} 99%: {row['dirs_99_median']:>5.0f}  "
            f"99.9%: {row['dirs_999_median']:>5.0f} (max {row['dirs_999_max']})  "
            f"free at 99.9%: {row['free_fraction_999_median']:.0%}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--scenes", type=int, default=16000)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine")
    ap.add_argument("--skip-eval", action="store_true", help="train only")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights in --out")
    ap.add_argument(
        "--finetune-check",
        action="store_true",
        help="also fine-tune the attention layers on one new concept and measure its identity",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    info_path = args.out / INFO_FILE
    info = json.loads(info_path.read_text()) if args.eval_only and info_path.exists() else {}
    if not args.eval_only:
        info = pretrain(args.out, args.scenes, args.vae_steps, args.unet_steps, args.batch, args.seed)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    if not args.skip_eval:
        info["room"] = prior_room(args.out, seed=args.seed)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print_room(info["room"])
        info["prompt_following"] = prompt_following(args.out, seed=args.seed)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info["prompt_following"], indent=2))
    if args.finetune_check:
        info["concept_finetune"] = concept_finetune_check(args.out, seed=args.seed)
        info["concept_finetune_lora4"] = concept_finetune_check(args.out, seed=args.seed, lr=5e-3, lora_rank=4)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps({k: info[k] for k in ("concept_finetune", "concept_finetune_lora4")}, indent=2))


if __name__ == "__main__":
    main()
