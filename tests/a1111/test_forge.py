"""The same extension, unchanged, inside a real Forge (dfdcbab6, UI mode, CPU, offline).

Forge detects models by shape, so it runs the random full-size SD1.5 checkpoint. Two random SD1.5-shaped
kohya LoRAs (the checkpoint's own attention shapes) are imported into a new bank through the extension's
API, then the accordion composes them through Forge's built-in Lora network, and the probe compares
Forge's patched UNet weights with base + the sum of the bank's deltas.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from webui_harness import WebUI

BANK = "forge_bank.safetensors"
MAX_ABS_ERR = 1e-6
pytestmark = pytest.mark.slow


def attention_shapes(checkpoint) -> dict[str, tuple[int, int]]:
    """LDM module name -> (out, in) of every UNet attention projection in the checkpoint."""
    pat = re.compile(r"^model\.diffusion_model\.(.+\.attn[12]\.(to_q|to_k|to_v|to_out\.0))\.weight$")
    out = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            m = pat.match(key)
            if m:
                out[m.group(1)] = tuple(f.get_slice(key).get_shape())
    return out


def random_kohya(path, shapes: dict[str, tuple[int, int]], seed: int, rank: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (m, n) in shapes.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, n, generator=g) / n**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(m, rank, generator=g) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_output_name": path.stem})


def txt2img(server: WebUI, args: list | None) -> dict:
    body = {"prompt": "a photo", "steps": 2, "width": 64, "height": 64, "seed": 1, "cfg_scale": 5}
    if args is not None:
        body["alwayson_scripts"] = {"SeqLoRA": {"args": args}}
    out = server.ok("POST", "/sdapi/v1/txt2img", body, timeout=1800)
    out["info"] = json.loads(out["info"])
    return out


def compare(server: WebUI, strengths: dict[str, float]) -> dict:
    return server.ok(
        "POST", "/seqlora_probe/v1/compare", {"bank": str(server.banks_dir / BANK), "strengths": strengths}
    )


def test_forge_loads_the_extension_unchanged(forge: WebUI):
    log = forge.log()
    assert "SeqLoRA 0.1.0 loaded in Forge" in log
    bad = [ln for ln in log.splitlines() if "seqlora" in ln.lower() and re.search(r"error|traceback|failed", ln, re.I)]
    assert not bad, bad
    ours = [s for s in forge.ok("GET", "/sdapi/v1/script-info") if s["name"] == "seqlora"]
    assert len(ours) == 2 and all(s["is_alwayson"] for s in ours)
    ids = {c.get("props", {}).get("elem_id") for c in forge.config()["components"]}
    assert {"tab_seqlora_tab", "seqlora_txt2img", "seqlora_train"} <= ids
    print(f"Forge started in {forge.started_s:.0f} s")


def test_forge_composes_imported_concepts_exactly(forge: WebUI, sd15_checkpoint):
    txt2img(forge, None)  # Forge loads the checkpoint on the first generation
    shapes = attention_shapes(sd15_checkpoint)
    assert len(shapes) == 128
    for i, name in enumerate(("theirs_a", "theirs_b")):
        random_kohya(forge.lora_dir / f"{name}.safetensors", shapes, seed=i)
        msg = forge.ok("POST", "/seqlora/v1/import", {"bank": "forge_bank", "lora": name, "name": name[-1]})
        assert "128 of 128 layers" in msg["message"], msg
    for selection, strengths in [("a:1", {"a": 1.0}), ("a:1, b:0.7", {"a": 1.0, "b": 0.7})]:
        out = txt2img(forge, [True, BANK, selection])
        assert len(out["images"]) == 1
        assert f'SeqLoRA: "{BANK}: {selection}"' in out["info"]["infotexts"][0]
        got = compare(forge, strengths)
        print(f"Forge {selection}: {got}")
        assert got["host"] == "forge"
        assert got["matched"] == got["layers"] == got["patched"] == 128
        assert got["max_abs_err"] < MAX_ABS_ERR and got["max_delta"] > 100 * got["max_abs_err"]
        assert got["other_layers_changed"] == []
    loaded = [ln for ln in forge.log().splitlines() if "[LORA]" in ln and "forge_bank__" in ln]
    assert any("with 128 keys" in ln and "(skipped 0 keys)" in ln for ln in loaded), loaded
    assert not any("unmatched" in ln or "mismatch" in ln.lower() for ln in loaded), loaded


def test_forge_reapplies_a_concept_whose_bank_changed(forge: WebUI):
    from seqlora_core import ConceptBank

    path = forge.banks_dir / BANK
    bank = ConceptBank.load(path)
    a = bank.concept("a")
    for cl in a.layers.values():
        cl.B = cl.B * 2.0
    bank.save(path)
    txt2img(forge, [True, BANK, "a:1, b:0.7"])
    got = compare(forge, {"a": 1.0, "b": 0.7})
    assert got["patched"] == 128 and got["max_abs_err"] < MAX_ABS_ERR, got


def test_forge_training_is_a_clear_message(forge: WebUI, concept_images):
    forge.ok(
        "POST",
        "/seqlora/v1/train",
        {"bank": BANK, "name": "new", "triggers": "new thing", "images": str(concept_images["dog"]), "steps": 2},
    )
    for _ in range(120):
        st = forge.ok("GET", "/seqlora/v1/train/status")
        if st["state"] not in ("queued", "running"):
            break
        import time

        time.sleep(1)
    assert st["state"] == "error" and "Forge" in st["message"], st
