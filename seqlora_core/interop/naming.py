"""Module-name maps between diffusers and LDM (ComfyUI/A1111) UNet layouts.

The maps are derived from the UNet's block structure (levels, resnets per level, transformer depth of
every attention block), so one function covers SD1.x, SD2.x, SDXL and tiny test UNets. Names are module
names (no `.weight`): `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` <->
`input_blocks.1.1.transformer_blocks.0.attn1.to_q`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# children of one Transformer2DModel / SpatialTransformer (same names in both layouts)
_ATTENTION = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK = (
    "norm1",
    "norm2",
    "norm3",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
_BASIC = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LABEL_EMB = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


@dataclass(frozen=True)
class UNetStructure:
    """Block structure of an SD-style UNet: enough to name every module in both layouts.

    `down_depths[level][i]`: transformer depth of the attention after resnet `i` of down level `level`
    (0 = no attention). `up_depths[b][i]`: the same for diffusers up block `b` (deepest level first,
    one more resnet than the matching down level). `mid_depth`: transformer depth of the middle block's
    attention, None for a middle block without one. `label_emb`: the diffusers name of the module that
    LDM calls `label_emb.0` (`"add_embedding"` for SDXL), or None.
    """

    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    mid_depth: int | None = 1
    label_emb: str | None = None

    def __post_init__(self) -> None:
        n = len(self.down_depths)
        if n == 0 or len(self.up_depths) != n:
            raise ValueError(f"need as many up blocks as down levels, got {n} and {len(self.up_depths)}")
        for b, depths in enumerate(self.up_depths):
            if len(depths) != len(self.down_depths[n - 1 - b]) + 1:
                raise ValueError(f"up block {b} must have one resnet more than down level {n - 1 - b}")

    @property
    def num_levels(self) -> int:
        return len(self.down_depths)

    @property
    def layers_per_block(self) -> tuple[int, ...]:
        return tuple(len(d) for d in self.down_depths)


STRUCTURE_META = "unet_structure"  # ConceptBank.meta key: the trained UNet's block structure


def structure_to_meta(s: UNetStructure) -> dict[str, Any]:
    """A `UNetStructure` as plain JSON data (stored in a bank's meta)."""
    return {
        "down": [list(d) for d in s.down_depths],
        "up": [list(d) for d in s.up_depths],
        "mid": s.mid_depth,
        "label_emb": s.label_emb,
    }


def structure_from_meta(data: Mapping[str, Any]) -> UNetStructure:
    """The `UNetStructure` that `structure_to_meta` stored (ValueError when malformed)."""
    try:
        down = tuple(tuple(int(x) for x in d) for d in data["down"])
        up = tuple(tuple(int(x) for x in d) for d in data["up"])
        mid = data.get("mid")
        return UNetStructure(down, up, None if mid is None else int(mid), data.get("label_emb"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed UNet structure {data!r}: {e}") from None


def _per_resnet(value: Any, n: int) -> tuple[int, ...]:
    """An int or a per-resnet sequence -> a tuple of n ints."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"expected {n} transformer depths, got {out}")
    return out


def _from_diffusers_config(cfg: Mapping[str, Any]) -> UNetStructure:
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(down_types)
    for t in down_types + up_types:
        if t not in _DOWN_TYPES and t not in _UP_TYPES:
            raise ValueError(f"unsupported UNet block type {t!r}: only (CrossAttn)Down/UpBlock2D are mapped")
    lpb = cfg.get("layers_per_block", 2)
    lpb = [lpb] * n if isinstance(lpb, int) else list(lpb)
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rtl = cfg.get("reverse_transformer_layers_per_block") or list(reversed(tl))
    down = tuple(_per_resnet(tl[i], lpb[i]) if _DOWN_TYPES[down_types[i]] else (0,) * lpb[i] for i in range(n))
    up = tuple(
        _per_resnet(rtl[b], lpb[n - 1 - b] + 1) if _UP_TYPES[up_types[b]] else (0,) * (lpb[n - 1 - b] + 1)
        for b in range(n)
    )
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid: int | None = None
    if mid_type == "UNetMidBlock2DCrossAttn":
        last = tl[-1]
        mid = int(last if isinstance(last, int) else last[0])
    elif mid_type not in (None, "UNetMidBlock2D"):
        raise ValueError(f"unsupported mid block type {mid_type!r}")
    label = None
    if cfg.get("addition_embed_type") == "text_time":
        label = "add_embedding"
    elif cfg.get("class_embed_type") is not None:
        label = "class_embedding"
    return UNetStructure(down, up, mid, label)


def _from_ldm_config(cfg: Mapping[str, Any]) -> UNetStructure:
    """ComfyUI's `unet_config` (num_res_blocks, channel_mult, transformer_depth[_output|_middle])."""
    n = len(cfg["channel_mult"])
    nrb = cfg["num_res_blocks"]
    nrb = [nrb] * n if isinstance(nrb, int) else list(nrb)
    td = list(cfg["transformer_depth"])
    tdo = list(cfg["transformer_depth_output"])  # stored shallow level first, like `transformer_depth`
    down, k = [], 0
    for level in range(n):
        down.append(tuple(td[k : k + nrb[level]]))
        k += nrb[level]
    up, k = [], 0
    per_level_out = []
    for level in range(n):
        per_level_out.append(tuple(tdo[k : k + nrb[level] + 1]))
        k += nrb[level] + 1
    for b in range(n):  # up block b = LDM level n-1-b; output blocks of a level run in reverse order
        up.append(tuple(reversed(per_level_out[n - 1 - b])))
    mid = cfg.get("transformer_depth_middle")
    mid = down[-1][-1] if mid is None else (int(mid) if mid >= 0 else None)
    label = "add_embedding" if cfg.get("adm_in_channels") else None
    return UNetStructure(tuple(down), tuple(up), mid, label)


def unet_structure(source: Any) -> UNetStructure:
    """A `UNetStructure` from a diffusers UNet (or its config), a ComfyUI `unet_config`, or itself."""
    if isinstance(source, UNetStructure):
        return source
    cfg = getattr(source, "config", source)
    if isinstance(cfg, Mapping):
        if "down_block_types" in cfg:
            return _from_diffusers_config(cfg)
        if "num_res_blocks" in cfg:
            return _from_ldm_config(cfg)
    raise TypeError(f"cannot read a UNet block structure from {type(source).__name__}")


def _attention(d: str, ldm: str, depth: int, out: dict[str, str]) -> None:
    for child in _ATTENTION:
        out[f"{d}.{child}"] = f"{ldm}.{child}"
    for t in range(depth):
        for child in _TRANSFORMER_BLOCK:
            out[f"{d}.transformer_blocks.{t}.{child}"] = f"{ldm}.transformer_blocks.{t}.{child}"


def _resnet(d: str, ldm: str, out: dict[str, str]) -> None:
    for child, ldm_child in _RESNET.items():
        out[f"{d}.{child}"] = f"{ldm}.{ldm_child}"


def _build_map(s: UNetStructure) -> dict[str, str]:
    out = dict(_BASIC)
    if s.label_emb:
        out.update({f"{s.label_emb}.{k}": v for k, v in _LABEL_EMB.items()})
    n, idx = s.num_levels, 1
    for level, depths in enumerate(s.down_depths):
        for i, depth in enumerate(depths):
            _resnet(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{idx}.0", out)
            if depth:
                _attention(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{idx}.1", depth, out)
            idx += 1
        if level < n - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    _resnet("mid_block.resnets.0", "middle_block.0", out)
    if s.mid_depth is not None:
        _attention("mid_block.attentions.0", "middle_block.1", s.mid_depth, out)
        _resnet("mid_block.resnets.1", "middle_block.2", out)
    idx = 0
    for b, depths in enumerate(s.up_depths):
        for i, depth in enumerate(depths):
            _resnet(f"up_blocks.{b}.resnets.{i}", f"output_blocks.{idx}.0", out)
            if depth:
                _attention(f"up_blocks.{b}.attentions.{i}", f"output_blocks.{idx}.1", depth, out)
            if b < n - 1 and i == len(depths) - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if depth else 1}.conv"
            idx += 1
    return out


def diffusers_to_ldm_map(source: Any) -> dict[str, str]:
    """diffusers module name -> LDM module name for every weight-bearing UNet module.

    `source`: anything `unet_structure` accepts. Given an `nn.Module`, only its own module names are
    kept (a structure alone also lists `conv_shortcut`s that a given UNet may lack).
    """
    out = _build_map(unet_structure(source))
    named_modules = getattr(source, "named_modules", None)
    if callable(named_modules):
        present = {name for name, _ in named_modules()}
        out = {k: v for k, v in out.items() if k in present}
    return out


def ldm_to_diffusers_map(source: Any) -> dict[str, str]:
    """LDM module name -> diffusers module name (the inverse of `diffusers_to_ldm_map`)."""
    return {v: k for k, v in diffusers_to_ldm_map(source).items()}


def to_kohya_name(module_name: str, prefix: str = "lora_unet") -> str:
    """kohya/A1111 LoRA name: prefix + "_" + module path with every "." -> "_"."""
    return f"{prefix}_{module_name.replace('.', '_')}" if prefix else module_name.replace(".", "_")


def kohya_lookup(module_names: Iterable[str], prefix: str = "lora_unet") -> dict[str, str]:
    """kohya name -> dotted module name, for resolving underscored names against known modules."""
    out: dict[str, str] = {}
    for name in module_names:
        key = to_kohya_name(name, prefix)
        if out.setdefault(key, name) != name:
            raise ValueError(f"module names {out[key]!r} and {name!r} share the kohya name {key!r}")
    return out


def rename(items: Mapping[str, Any], name_map: Mapping[str, str]) -> dict[str, Any]:
    """Re-key `items` through `name_map`; a name the map lacks is a KeyError naming it."""
    missing = [k for k in items if k not in name_map]
    if missing:
        raise KeyError(f"{len(missing)} module names have no mapping, first: {missing[:3]}")
    return {name_map[k]: v for k, v in items.items()}


# SD1.x and SD2.x share one block layout; SD2 differs only in widths, heads and linear proj_in/out.
SD1 = UNetStructure(
    down_depths=((1, 1), (1, 1), (1, 1), (0, 0)),
    up_depths=((0, 0, 0), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    mid_depth=1,
)
SDXL = UNetStructure(
    down_depths=((0, 0), (2, 2), (10, 10)),
    up_depths=((10, 10, 10), (2, 2, 2), (0, 0, 0)),
    mid_depth=10,
    label_emb="add_embedding",
)
PRESETS: dict[str, UNetStructure] = {"sd1": SD1, "sd2": SD1, "sdxl": SDXL}


def guess_structure(names: Iterable[str]) -> UNetStructure:
    """The preset (SD1/2 first, then SDXL) under which the most of `names` are known modules.

    `names`: dotted diffusers or LDM module names, or kohya-underscored ones (`lora_unet_` prefix).
    """
    names = list(names)
    best, best_hits = SD1, -1
    for structure in (SD1, SDXL):
        d2l = _build_map(structure)
        known = set(d2l) | set(d2l.values())
        known |= set(kohya_lookup(known))
        hits = sum(n in known for n in names)
        if hits > best_hits:
            best, best_hits = structure, hits
    return best
