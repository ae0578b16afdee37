"""Test-only web UI extension: reads the weights the host's Lora network patched, for tests/a1111.

``POST /seqlora_probe/v1/compare {"bank": <path>, "strengths": {concept: s}}`` compares, for every layer
of the bank, the patched weight minus the host's own backup of the original weight with
sum_i s_i * B_i @ A_i from the bank (fp32), and checks that no other layer changed. A1111 keeps the
backup on the module (``network_weights_backup``); Forge in its UNet patcher's ``lora_loader.backup``.
The harness links this folder into the test server's extensions only.
"""

import torch
from modules import script_callbacks, shared

from seqlora_core import ConceptBank


def _a1111_pairs(names):
    diffusion = shared.sd_model.model.diffusion_model
    for name in names:
        m = diffusion.get_submodule(name)
        yield name, m.weight.detach(), getattr(m, "network_weights_backup", None)


def _a1111_others(names):
    diffusion = shared.sd_model.model.diffusion_model
    changed = []
    for name, m in diffusion.named_modules():
        b = getattr(m, "network_weights_backup", None)
        if (
            name not in names
            and isinstance(b, torch.Tensor)
            and hasattr(m, "weight")
            and not torch.equal(m.weight.detach().cpu(), b.cpu())
        ):
            changed.append(name)
    return changed


def _forge_pairs(names):
    unet = shared.sd_model.forge_objects.unet
    backup = unet.model.lora_loader.backup
    diffusion = unet.model.diffusion_model
    for name in names:
        key = f"diffusion_model.{name}.weight"
        yield name, diffusion.get_submodule(name).weight.detach(), backup.get(key)


def _forge_others(names):
    unet = shared.sd_model.forge_objects.unet
    model = unet.model
    changed = []
    for key, b in model.lora_loader.backup.items():
        name = key[len("diffusion_model.") : -len(".weight")] if key.startswith("diffusion_model.") else key
        if name in names:
            continue
        cur = dict(model.named_parameters()).get(key)
        if cur is not None and not torch.equal(cur.detach().cpu(), b.detach().cpu()):
            changed.append(name)
    return changed


def compare(body):
    bank = ConceptBank.load(body["bank"])
    strengths = {k: float(v) for k, v in body["strengths"].items()}
    forge = hasattr(shared.sd_model, "forge_objects")
    names = [s.name for s in bank.layers]
    pairs = _forge_pairs(names) if forge else _a1111_pairs(names)
    matched = patched = 0
    max_err = max_delta = max_rel = 0.0
    for name, weight, backup in pairs:
        expected = torch.zeros(weight.shape, dtype=torch.float32)
        for concept, s in strengths.items():
            expected += s * bank.concept(concept).delta(name).reshape(weight.shape)
        actual = (weight.float().cpu() - backup.float().cpu()) if backup is not None else torch.zeros_like(expected)
        matched += 1
        patched += int(backup is not None and bool((actual != 0).any()))
        err = float((actual - expected).abs().max())
        scale = float(expected.abs().max())
        max_err = max(max_err, err)
        max_delta = max(max_delta, scale)
        if scale > 0:
            max_rel = max(max_rel, err / scale)
    others = _forge_others(set(names)) if forge else _a1111_others(set(names))
    return {
        "layers": len(names),
        "matched": matched,
        "patched": patched,
        "max_abs_err": max_err,
        "max_rel_err": max_rel,
        "max_delta": max_delta,
        "other_layers_changed": others,
        "host": "forge" if forge else "a1111",
    }


def on_app_started(_demo, app):
    from fastapi import Body

    @app.post("/seqlora_probe/v1/compare")
    def compare_route(body: dict = Body(...)):  # noqa: B008
        return compare(body)


script_callbacks.on_app_started(on_app_started)
