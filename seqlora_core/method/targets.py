"""Which layers of a model get adapters: presets and name patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")

PRESETS: dict[str, tuple[str, ...]] = {
    # attention projections of every transformer block (the method's default)
    "attn": tuple(f"*.attn[12].{p}" for p in ATTN_PROJ) + tuple(f"attn[12].{p}" for p in ATTN_PROJ),
    # cross-attention keys and values only (they see the text embeddings)
    "cross_kv": ("*.attn2.to_k", "*.attn2.to_v", "attn2.to_k", "attn2.to_v"),
    # attention plus the feed-forward of each transformer block
    "attn_ff": tuple(f"*.attn[12].{p}" for p in ATTN_PROJ)
    + tuple(f"attn[12].{p}" for p in ATTN_PROJ)
    + ("*.ff.net.0.proj", "*.ff.net.2"),
    # every Linear layer
    "all_linear": ("*",),
}


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one adapted layer: dW is (out_features x in_features), conv kernels flattened."""

    name: str
    kind: str  # "linear" or "conv2d"
    out_features: int
    in_features: int  # n: for a conv, in_channels * kh * kw
    kernel: tuple[int, int] = (1, 1)


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The spec of a Linear or Conv2d layer."""
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        if module.groups != 1:
            raise ValueError(f"layer {name!r}: grouped convolutions cannot carry a LoRA")
        return LayerSpec(name, "conv2d", module.out_channels, module.in_channels * kh * kw, (kh, kw))
    raise TypeError(f"layer {name!r} is a {type(module).__name__}; only Linear and Conv2d can be adapted")


def _compile(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        out.append(re.compile(p[3:]) if p.startswith("re:") else re.compile(fnmatch.translate(p)))
    return out


def resolve_patterns(targets: str | Iterable[str]) -> tuple[str, ...]:
    """A preset name, a comma-separated string of patterns, or a list of patterns -> patterns.

    Patterns are shell globs on module names (``*.attn2.to_k``) or regexes prefixed ``re:``.
    """
    if isinstance(targets, str):
        if targets in PRESETS:
            return PRESETS[targets]
        parts = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not parts:
            raise ValueError(f"targets: empty; use a preset ({', '.join(PRESETS)}) or name patterns")
        return parts
    parts = tuple(targets)
    if not parts:
        raise ValueError(f"targets: empty; use a preset ({', '.join(PRESETS)}) or name patterns")
    return parts


def find_targets(model: nn.Module, targets: str | Iterable[str] = "attn") -> list[LayerSpec]:
    """The adaptable layers of ``model`` whose names match ``targets``, in module order."""
    patterns = resolve_patterns(targets)
    compiled = _compile(patterns)
    every_linear = patterns == PRESETS["all_linear"]
    found = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if every_linear and not isinstance(module, nn.Linear):
            continue
        if any(rx.fullmatch(name) for rx in compiled):
            found.append(layer_spec(name, module))
    if not found:
        raise ValueError(
            f"targets {list(patterns)!r} match no Linear or Conv2d layer of {type(model).__name__}; "
            f"choose a preset ({', '.join(PRESETS)}) or patterns that name its layers"
        )
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``."""
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
