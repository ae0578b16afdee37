"""The toy world: committed base pipeline, scenes, concept generator and identity metric."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from seqlora_core.toy.concepts import concept_examples, concept_spec, write_concept_folder
from seqlora_core.toy.identity import (
    N_IDENTITY,
    NONE,
    identity_accuracy,
    identity_data,
    identity_probs,
    identity_scores,
    noise_images,
)
from seqlora_core.toy.model import WEIGHTS_DIR, load_toy_pipeline, trigger_word, trigger_words
from seqlora_core.toy.scenes import Scene, SceneObject, render_scene, scene_dataset, scene_prompt, vocabulary


@pytest.fixture(scope="module")
def pipe():
    return load_toy_pipeline()


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 10) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="pt").images


def test_scenes_are_deterministic_and_captioned():
    a, prompts_a, _ = scene_dataset(6, seed=3)
    b, prompts_b, _ = scene_dataset(6, seed=3)
    assert np.array_equal(a, b) and prompts_a == prompts_b
    assert a.shape == (6, 32, 32, 3)
    scene = Scene((SceneObject("circle", "red", "left"),), "white")
    assert scene_prompt(scene) == "a red circle on the left"
    img = np.asarray(render_scene(scene, seed=0)).astype(int)
    assert img[16, 8, 0] > 180 and img[16, 8, 2] < 100  # red on the left
    assert img[16, 26].min() > 200  # white on the right


def test_tokenizer_has_one_token_per_word(pipe):
    tok = pipe.tokenizer
    words = vocabulary() + trigger_words()
    ids = [tok(w, add_special_tokens=False).input_ids for w in words]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(words)
    assert tok.model_max_length == 32 and len(tok) == pipe.text_encoder.config.vocab_size
    assert trigger_word(0) == "zqaa" and trigger_word(27) == "zqbb"


def test_weights_are_small_and_load_fast():
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert size < 20 * 2**20  # 18.0 MiB: UNet 12.2, text encoder 5.1, identity CNN 0.4, VAE 0.3
    t0 = time.perf_counter()
    load_toy_pipeline()
    assert time.perf_counter() - t0 < 5.0  # well under a second on an idle machine


def test_generation_is_deterministic(pipe):
    a = generate(pipe, ["a red circle in the center"])
    b = generate(pipe, ["a red circle in the center"])
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_prompts_steer_colour_and_shape(pipe):
    prompts = ["a big red square in the center"] * 3 + ["a big blue square in the center"] * 3
    images = generate(pipe, prompts, seed=1)
    redness = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
    assert redness[:3].min() > redness[3:].max()
    # a ring is hollow, a circle is not: the centre tells them apart. (Position is not asserted: toy v2
    # follows it about half the time, pretrain_info.json's prompt_following, which the README reports.)
    centre = lambda x: x[:, :, 13:19, 13:19].mean(dim=(1, 2, 3))  # noqa: E731
    circle = generate(pipe, ["a big yellow circle in the center, black background"] * 3, seed=1)
    ring = generate(pipe, ["a big yellow ring in the center, black background"] * 3, seed=1)
    assert centre(circle).min() > 0.4 and centre(ring).max() < 0.25


def test_trigger_words_embed_distinctly(pipe):
    tok, te = pipe.tokenizer, pipe.text_encoder
    prompts = [f"a photo of {trigger_word(i)}" for i in range(8)]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        h = torch.nn.functional.normalize(te(ids)[0][:, 4], dim=1)
    cos = h @ h.T
    assert cos[~torch.eye(8, dtype=torch.bool)].max() < 0.9


def test_concepts_are_deterministic(tmp_path):
    a, b = concept_examples(5, n=8), concept_examples(5, n=8)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True))
    assert all(trigger_word(5) in c for _, c in a)
    assert concept_spec(5).trigger == trigger_word(5)
    assert (
        not np.array_equal(concept_spec(5).glyph, concept_spec(6).glyph)
        or concept_spec(5).colour1 != concept_spec(6).colour1
    )
    paths = write_concept_folder(5, tmp_path / "c5", n=6)
    assert len(paths) == 6
    for p in paths:
        assert p.is_file() and p.with_suffix(".txt").read_text().strip().startswith(("a photo of zqaf", "zqaf"))


def test_identity_classifier_validated():
    x, y = identity_data(n_per_concept=3, n_none=24, seed=4242)
    concept = y < NONE
    assert identity_accuracy(x[concept], y[concept].tolist()) >= 0.95
    probs = identity_probs(x[~concept])
    assert (probs.argmax(-1) == NONE).float().mean() >= 0.9
    noise = noise_images(99, seed=7)
    targets = [i % N_IDENTITY for i in range(99)]
    assert identity_accuracy(noise, targets) <= 2.0 / (N_IDENTITY + 1)
    assert identity_scores(noise, targets).mean() < 0.1
    with pytest.raises(ValueError):
        identity_scores(noise[:2], [0, N_IDENTITY])


@pytest.mark.slow
def test_toy_prior_is_the_base_worlds_own_scenes(pipe, tmp_path):
    from seqlora_core.apps.recipes import learn_toy_concept
    from seqlora_core.toy.evaluation import toy_prior_data

    data = toy_prior_data(pipe, n=8)
    batch = data.batches(0)
    assert batch["latents"].shape == (4, 4, 16, 16)
    vocab = set(vocabulary())
    for caption in batch["captions"]:  # scene prompts: base words only, never a trigger
        assert set(caption.replace(",", " ").split()) <= vocab
        assert not any(w.startswith("zq") for w in caption.split())
    bank = learn_toy_concept(pipe, None, 0, tmp_path / "c", steps=2, images=5, stats_batches=1)
    prior = bank.prior[bank.layers[0].name]
    own = bank.concepts[0].layers[bank.layers[0].name].sketch
    assert prior is not None and own is not None and not torch.allclose(prior.factor, own.factor)
