"""Banks for tests: a synthetic one (no training, every optional part filled in) and a first concept made
as the command line makes it on the tiny base, quickly."""

from __future__ import annotations

from pathlib import Path

import torch

from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
from seqlora_core.method.stats import Sketch
from seqlora_core.method.targets import find_targets
from tests._unet import tiny_unet


def _orthonormal(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, rows, generator=g))[0].T.contiguous()


def synthetic_bank(concepts: int = 2) -> ConceptBank:
    """A valid bank over a tiny UNet's attention layers, with every optional part filled in."""
    g = torch.Generator().manual_seed(0)
    specs = find_targets(tiny_unet(), "attn")[:4]
    prior = {}
    for s in specs:
        prior[s.name] = Sketch(_orthonormal(3, s.in_features, g).T.contiguous(), torch.rand(3, generator=g), 5.0)
    cs = []
    for i in range(concepts):
        layers = {}
        for s in specs:
            layers[s.name] = ConceptLayer(
                _orthonormal(2, s.in_features, g),
                torch.randn(s.out_features, 2, generator=g) * 0.1,
                Sketch(_orthonormal(3, s.in_features, g).T.contiguous(), torch.rand(3, generator=g) + 0.1, 4.0),
                i == 1,
                None,
                {"protected": 3, "energy": 0.9, "free": 20},
            )
        info = {
            "self_energy": 1.0,
            "received_interference": {f"c{j}": 0.01 for j in range(i)},
            "delta_norm_ratio": {"mean": 0.1, "max": 0.2},
            "budget": {"budget": 0.05, "achieved": 0.01, "met": True, "layers_over": 0, "layers": 4},
            "config": {"steps": 3},
        }
        timings = {"total_s": 1.0}
        cs.append(Concept(f"c{i}", [f"tok{i} thing"], 2, "seqlora", layers, "trained", [1.0, 0.5], timings, info))
    return ConceptBank(specs, "diffusers", "sd15", prior, cs, {"weight_norms": {s.name: 3.0 for s in specs}})


def first_bank(images: Path, path: Path) -> None:
    """A bank with one concept 'sks', as the command line makes it on the tiny base, with its prior taken
    from the concept's trigger-free captions instead of generated images (seconds instead of minutes)."""
    from seqlora_core.backends.diffusers_backend import DiffusersConceptData, diffusion_loss
    from seqlora_core.backends.tiny import build_tiny_pipeline
    from seqlora_core.data.dataset import ConceptDataset
    from seqlora_core.method.trainer import TrainConfig, train_concept

    pipe = build_tiny_pipeline()
    data = DiffusersConceptData(pipe, ConceptDataset.from_folder(images, "sks cat", resolution=64))
    cfg = TrainConfig("sks", ["sks cat"], steps=2, stats_batches=2, layer_naming="diffusers", architecture="tiny")
    train_concept(pipe.unet, diffusion_loss, data.batches, cfg, None, data.prior_batches).save(path)
