"""SeqLoRA inside a real Automatic1111 v1.10.1 (UI mode, CPU, offline) on the tiny LDM checkpoint.

The tests run in file order and share one server: the tab trains 'sks', the API trains 'zqx' (interrupted,
then resumed from the tab), the accordion composes them, and the bad inputs come last.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from webui_harness import REPO_ROOT, WebUI, snapshot

BANK = "tab_bank.safetensors"
SETTINGS = {
    "caption": "a photo of {trigger}",
    "method": "seqlora",
    "rank": 4,
    "lr": 1e-3,
    "budget": 0.05,
    "targets": "attn",
    "resolution": 64,
    "batch": 1,
    "seed": 0,
}
MAX_ABS_ERR = 1e-6  # fp32 weights and fp32 exports: only rounding of base + delta remains
pytestmark = pytest.mark.slow


def tab_fields(bank: str, name: str, triggers: str, images: str, steps: int, every: int) -> list:
    s = SETTINGS
    return [
        bank,
        name,
        triggers,
        images,
        s["caption"],
        s["method"],
        s["rank"],
        steps,
        s["lr"],
        s["budget"],
        s["targets"],
        s["resolution"],
        s["batch"],
        s["seed"],
        every,
    ]


def txt2img(server: WebUI, prompt: str, args: list | None, seed: int = 1) -> dict:
    body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": seed, "cfg_scale": 5}
    if args is not None:
        body["alwayson_scripts"] = {"SeqLoRA": {"args": args}}
    out = server.ok("POST", "/sdapi/v1/txt2img", body)
    out["info"] = json.loads(out["info"])
    return out


def wait_status(server: WebUI, done, timeout: float = 900) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = server.ok("GET", "/seqlora/v1/train/status")
        if done(st):
            return st
        time.sleep(1)
    raise AssertionError(f"training status did not settle: {st}\n{server.log()[-3000:]}")


def compare(server: WebUI, strengths: dict[str, float]) -> dict:
    return server.ok(
        "POST", "/seqlora_probe/v1/compare", {"bank": str(server.banks_dir / BANK), "strengths": strengths}
    )


def cli_report(bank: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "seqlora_core", "report", "--bank", str(bank), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------------ load


def test_extension_loads_without_errors(a1111: WebUI):
    log = a1111.log()
    assert "SeqLoRA 0.1.0 loaded in Automatic1111" in log
    bad = [
        ln
        for ln in log.splitlines()
        if re.search(r"seqlora", ln, re.I) and re.search(r"error|traceback|exception|failed", ln, re.I)
    ]
    assert not bad, bad
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
    info = a1111.ok("GET", "/sdapi/v1/script-info")
    ours = [s for s in info if s["name"] == "seqlora"]
    assert {s["is_img2img"] for s in ours} == {False, True}
    assert all(s["is_alwayson"] for s in ours)
    assert [a["label"] for a in ours[0]["args"]] == ["SeqLoRA", "Bank", "Concepts (name:strength, !off:strength)"]
    assert a1111.ok("GET", "/seqlora/v1/banks")["banks"] == []


def test_tab_and_accordion_are_in_the_ui(a1111: WebUI):
    ids = {c.get("props", {}).get("elem_id") for c in a1111.config()["components"]}
    for elem in (
        "tab_seqlora_tab",
        "seqlora_txt2img",
        "seqlora_img2img",
        "seqlora_txt2img_concepts",
        "seqlora_train",
        "seqlora_interrupt",
        "seqlora_resume",
        "seqlora_import",
        "seqlora_export",
        "seqlora_report",
    ):
        assert elem in ids, elem


# ------------------------------------------------------------------------------------------------ train


def test_train_in_the_tab_makes_a_bank_the_cli_reads(a1111: WebUI, concept_images):
    t0 = time.monotonic()
    view, result = map(
        html.unescape,
        a1111.predict(
            "seqlora_train",
            ["task(t1)", *tab_fields("tab_bank", "sks", "sks dog", str(concept_images["dog"]), steps=12, every=4)],
        ),
    )
    took = time.monotonic() - t0
    assert "learned 'sks'" in result, result
    assert "sks" in view and "sks dog" in view
    rep = cli_report(a1111.banks_dir / BANK)
    assert rep["concepts"] == ["sks"]
    print(f"tab training, 12 steps: {took:.1f} s; CLI report: {rep['concepts']}, base drift {rep['base_drift'][0]:.4f}")
    # the concept was exported for the Lora network, with trigger words for its card
    side = json.loads((a1111.lora_dir / "seqlora" / "tab_bank__sks.json").read_text())
    assert side["activation text"] == "sks dog" and side["sd version"] == "SD1"
    loras = {x["name"]: x for x in a1111.ok("GET", "/sdapi/v1/loras")}
    assert loras["tab_bank__sks"]["alias"] == "tab_bank__sks"


def test_interrupt_then_resume_continues_from_saved_progress(a1111: WebUI, concept_images):
    steps = 24
    a1111.ok(
        "POST",
        "/seqlora/v1/train",
        {
            "bank": "tab_bank",
            "name": "zqx",
            "triggers": "zqx hat",
            "images": str(concept_images["hat"]),
            "steps": steps,
            "lr": 1e-3,
            "resolution": 64,
            "checkpoint_every": 4,
        },
    )
    wait_status(a1111, lambda s: s["state"] == "running" and s["step"] >= 6)
    prog = a1111.ok("GET", "/sdapi/v1/progress")  # the host's own progress: what its progress bar shows
    assert prog["state"]["job"] == "seqlora-train" and prog["state"]["job_count"] == steps
    assert prog["state"]["job_no"] >= 6 and 0 < prog["progress"] < 1 and "loss" in prog["textinfo"]
    a1111.ok("POST", "/sdapi/v1/interrupt")
    st = wait_status(a1111, lambda s: s["state"] in ("interrupted", "done", "error"))
    assert st["state"] == "interrupted", st
    at = st["step"]
    before = list(st["losses"])
    assert 6 <= at < steps and len(before) == at
    assert (a1111.banks_dir / ".autosave" / "tab_bank.zqx.partial.safetensors").is_file()
    assert [c["name"] for c in a1111.ok("GET", "/seqlora/v1/bank?name=" + BANK)["concepts"]] == ["sks"]

    view, result = map(html.unescape, a1111.predict("seqlora_resume", ["task(t2)", "tab_bank", "zqx"]))
    assert f"resumed at step {at}" in result, result
    st = a1111.ok("GET", "/seqlora/v1/train/status")
    assert st["resumed_from"] == at and st["step"] == steps
    bank = cli_report(a1111.banks_dir / BANK)
    assert bank["concepts"] == ["sks", "zqx"]
    from seqlora_core import ConceptBank

    curve = ConceptBank.load(a1111.banks_dir / BANK).concept("zqx").loss_curve
    assert len(curve) == steps
    assert curve[:at] == before  # the saved steps were kept, not re-run
    assert not (a1111.banks_dir / ".autosave" / "tab_bank.zqx.partial.safetensors").exists()
    print(f"interrupted at step {at}/{steps}, resumed at step {st['resumed_from']}; losses 1..{at} kept")


# ------------------------------------------------------------------------------------------------ compose


@pytest.mark.parametrize(
    "selection,strengths",
    [
        ("sks:1", {"sks": 1.0}),
        ("sks:1, zqx:0.7", {"sks": 1.0, "zqx": 0.7}),
    ],
)
def test_accordion_composition_is_base_plus_sum_of_deltas(a1111: WebUI, selection, strengths):
    out = txt2img(a1111, "a photo of sks dog wearing zqx hat", [True, BANK, selection])
    assert len(out["images"]) == 1
    text = out["info"]["infotexts"][0]
    for name, s in strengths.items():
        assert f"<lora:tab_bank__{name}:{s:g}>" in text
    assert f'SeqLoRA: "{BANK}: {selection}"' in text
    got = compare(a1111, strengths)
    print(f"{selection}: {got}")
    assert got["matched"] == got["layers"] == got["patched"] > 0
    assert got["max_abs_err"] < MAX_ABS_ERR and got["max_delta"] > 100 * got["max_abs_err"]
    assert got["other_layers_changed"] == []
    assert "tab_bank__" not in "".join(ln for ln in a1111.log().splitlines() if "didn't match keys" in ln)


def test_a_changed_bank_is_exported_and_applied_again(a1111: WebUI):
    """Same tags, same strengths, new factors: the host must not keep the weights it applied before."""
    from seqlora_core import ConceptBank

    path = a1111.banks_dir / BANK
    bank = ConceptBank.load(path)
    for cl in bank.concept("zqx").layers.values():
        cl.B = cl.B * 2.0
    bank.save(path)
    txt2img(a1111, "a photo of sks dog wearing zqx hat", [True, BANK, "sks:1, zqx:0.7"])
    got = compare(a1111, {"sks": 1.0, "zqx": 0.7})
    assert got["patched"] == got["layers"] and got["max_abs_err"] < MAX_ABS_ERR, got


def test_hires_fix_and_img2img_compose_the_same(a1111: WebUI):
    body = {
        "prompt": "a photo of sks dog",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 2,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 1,
        "denoising_strength": 0.5,
        "hr_upscaler": "Latent",
        "alwayson_scripts": {"SeqLoRA": {"args": [True, BANK, "sks:0.6, zqx:1"]}},
    }
    out = a1111.ok("POST", "/sdapi/v1/txt2img", body)
    info = json.loads(out["info"])
    assert "Hires upscale: 1.5" in info["infotexts"][0]
    assert info["infotexts"][0].count("<lora:tab_bank__sks:0.6>") == 1
    got = compare(a1111, {"sks": 0.6, "zqx": 1.0})
    assert got["patched"] == got["layers"] and got["max_abs_err"] < MAX_ABS_ERR, got
    body = {
        "init_images": [out["images"][0]],
        "prompt": "a photo of zqx hat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 3,
        "denoising_strength": 0.6,
        "alwayson_scripts": {"SeqLoRA": {"args": [True, BANK, "zqx:0.9"]}},
    }
    out = a1111.ok("POST", "/sdapi/v1/img2img", body)
    assert len(out["images"]) == 1 and "<lora:tab_bank__zqx:0.9>" in json.loads(out["info"])["infotexts"][0]
    got = compare(a1111, {"zqx": 0.9})
    assert got["patched"] == got["layers"] and got["max_abs_err"] < MAX_ABS_ERR, got


def test_without_the_accordion_the_base_is_restored(a1111: WebUI):
    txt2img(a1111, "a photo of a dog", [False, BANK, "sks:1"])
    got = compare(a1111, {})
    assert got["max_abs_err"] == 0.0 and got["other_layers_changed"] == []


def test_infotext_round_trip_restores_the_selection(a1111: WebUI):
    out = txt2img(a1111, "a photo of sks dog", [True, BANK, "sks:0.8, !zqx:0.5"])
    png = out["images"][0]
    params = a1111.ok("POST", "/sdapi/v1/png-info", {"image": "data:image/png;base64," + png})["parameters"]
    assert params["SeqLoRA"] == f"{BANK}: sks:0.8, !zqx:0.5"
    assert params["Prompt"] == "a photo of sks dog"  # our tags are taken out: the restored accordion adds them
    # what "send to txt2img" then generates: the same composition
    again = txt2img(a1111, params["Prompt"], [True, *params["SeqLoRA"].split(": ", 1)])
    assert again["info"]["infotexts"][0].split("\n")[0] == out["info"]["infotexts"][0].split("\n")[0]
    assert base64.b64decode(again["images"][0]) == base64.b64decode(png)


def test_exports_follow_the_bank(a1111: WebUI):
    lora = a1111.lora_dir / "seqlora"
    first = a1111.ok("POST", "/seqlora/v1/export", {"bank": BANK})["files"]
    assert {f["concept"] for f in first} == {"sks", "zqx"} and not any(f["written"] for f in first)
    mtimes = {p.name: p.stat().st_mtime_ns for p in lora.glob("*.safetensors")}
    # a new concept (a foreign LoRA imported) changes the bank: only the new file is written
    src = a1111.lora_dir / "theirs.safetensors"
    sd = load_file(lora / "tab_bank__sks.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file({k: torch.randn(v.shape, generator=g) * 0.05 if "lora_up" in k else v for k, v in sd.items()}, src)
    msg = a1111.ok("POST", "/seqlora/v1/import", {"bank": BANK, "lora": "theirs", "name": "theirs"})["message"]
    assert "frozen concept 'theirs'" in msg
    assert {p.name: p.stat().st_mtime_ns for p in lora.glob("tab_bank__[sz]*.safetensors")} == mtimes
    assert (lora / "tab_bank__theirs.safetensors").is_file()
    out = txt2img(a1111, "a photo", [True, BANK, "sks:1, theirs:0.5"])
    assert "<lora:tab_bank__theirs:0.5>" in out["info"]["infotexts"][0]
    got = compare(a1111, {"sks": 1.0, "theirs": 0.5})
    assert got["patched"] == got["layers"] and got["max_abs_err"] < MAX_ABS_ERR
    # report: both directions for every pair, and its heatmap
    rep = a1111.ok("GET", "/seqlora/v1/report?name=" + BANK)
    assert len(rep["pairs"]) == 3 and {"a_on_b", "b_on_a"} <= set(rep["pairs"][0])
    code, png = a1111.get("/seqlora/v1/report.png?name=" + BANK)
    assert code == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    img, text = a1111.predict("seqlora_report", [BANK])
    assert "a &rarr; b" in text and img


def test_a_bogus_key_is_reported_by_the_host_and_ours_never_are(a1111: WebUI):
    sd = load_file(a1111.lora_dir / "seqlora" / "tab_bank__sks.safetensors")
    sd["lora_unet_bogus_layer_xyz.alpha"] = torch.tensor(4.0)
    save_file(sd, a1111.lora_dir / "bogus_copy.safetensors")
    a1111.ok("POST", "/sdapi/v1/refresh-loras")
    txt2img(a1111, "a photo <lora:bogus_copy:1>", None)
    lines = [ln for ln in a1111.log().splitlines() if "didn't match keys" in ln]
    assert any("bogus_copy.safetensors" in ln and "lora_unet_bogus_layer_xyz" in ln for ln in lines), lines
    assert not any("/seqlora/" in ln for ln in lines), lines


# ------------------------------------------------------------------------------------------------ bad input


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def test_bad_input_is_a_clear_message_and_writes_nothing(a1111: WebUI, concept_images, tmp_path):
    from seqlora_core import ConceptBank, LayerSpec

    foreign = ConceptBank([LayerSpec("down_blocks.0.attentions.0.proj_in", "linear", 320, 320)], "diffusers", "sdxl")
    foreign.save(a1111.banks_dir / "foreign.safetensors")
    (a1111.banks_dir / "garbage.safetensors").write_bytes(b"\x07" * 1000)
    (a1111.lora_dir / "garbage_lora.safetensors").write_bytes(b"not a safetensors file at all")
    roots = [a1111.data_dir, a1111.host.path]
    skip = ("venv", "repositories", "logs", "tmp")
    before = snapshot(*roots, skip=skip)

    # API
    code, out = a1111.post(
        "/seqlora/v1/train", {"bank": BANK, "name": "x", "triggers": "x", "images": str(tmp_path / "missing")}
    )
    assert code == 400 and "image folder" in out["error"] and "does not exist" in out["error"]
    code, out = a1111.post(
        "/seqlora/v1/train", {"bank": "garbage", "name": "x", "triggers": "x", "images": str(concept_images["dog"])}
    )
    assert code == 400 and "garbage.safetensors" in out["error"], out
    code, out = a1111.post(
        "/seqlora/v1/train",
        {"bank": "foreign", "name": "x", "triggers": "x", "images": str(concept_images["dog"]), "steps": 2},
    )
    assert code == 200
    st = wait_status(a1111, lambda s: s["state"] in ("error", "done", "interrupted"))
    assert st["state"] == "error" and "trained on sdxl" in st["message"], st
    code, out = a1111.post("/seqlora/v1/import", {"bank": BANK, "lora": "garbage_lora", "name": "g"})
    assert code == 400 and "garbage_lora.safetensors" in out["error"], out
    code, out = a1111.post("/seqlora/v1/import", {"bank": BANK, "lora": "/etc/passwd", "name": "g"})
    assert code == 400 and "not a .safetensors file" in out["error"], out
    code, out = a1111.post(
        "/seqlora/v1/train", {"bank": "../outside", "name": "x", "triggers": "x", "images": str(concept_images["dog"])}
    )
    assert code == 400 and "inside the banks folder" in out["error"], out
    code, out = a1111.get("/seqlora/v1/bank?name=garbage.safetensors")
    assert code == 400 and "corrupt or truncated" in out["error"] and str(a1111.data_dir) not in out["error"], out
    listing = {b["bank"]: b for b in a1111.ok("GET", "/seqlora/v1/banks")["banks"]}
    assert "error" in listing["garbage.safetensors"] and "concepts" in listing[BANK]

    # the accordion: no image, and the message in the result
    for args, expect in [
        ([True, "foreign.safetensors", "a:1"], "not in foreign.safetensors"),
        ([True, "garbage.safetensors", "a:1"], "garbage.safetensors"),
        ([True, BANK, "sks:abc"], "not a number"),
        ([True, "nope.safetensors", "sks:1"], "not found"),
    ]:
        out = txt2img(a1111, "a photo", args)
        assert out["images"] == [], args
        assert "SeqLoRA error" in out["info"]["infotexts"][0] and expect in out["info"]["infotexts"][0], (
            args,
            out["info"]["infotexts"][0],
        )

    # the tab: the same messages, in its result area
    _, result = a1111.predict(
        "seqlora_train", ["task(t3)", *tab_fields(BANK, "x", "x", str(tmp_path / "missing"), steps=2, every=1)]
    )
    assert "seqlora-error" in result and "does not exist" in result
    _, result = a1111.predict("seqlora_import", [BANK, "garbage_lora", "g", ""])
    assert "seqlora-error" in result and "garbage_lora.safetensors" in result

    after = snapshot(*roots, skip=skip)
    changed = _changes(before, after)
    ours = [p for p in changed if "seqlora" in p.lower() or "/models/" in p]
    assert ours == [], ours
    host_files = {str(a1111.data_dir / n) for n in ("params.txt", "config.json", "cache.json", "ui-config.json")}
    assert set(changed) <= host_files | {p for p in changed if p.startswith(str(a1111.data_dir / "cache"))}, changed
    txt2img(a1111, "a photo", None)  # the host still generates
    assert ConceptBank.load(a1111.banks_dir / BANK).names() == ["sks", "zqx", "theirs"]


def test_training_never_overlaps_a_generation(a1111: WebUI, concept_images):
    """The API's training takes the host's queue lock: a txt2img sent meanwhile waits for it."""
    a1111.ok(
        "POST",
        "/seqlora/v1/train",
        {
            "bank": "lock_bank",
            "name": "c",
            "triggers": "c c",
            "images": str(concept_images["hat"]),
            "steps": 6,
            "resolution": 64,
        },
    )
    wait_status(a1111, lambda s: s["state"] == "running")
    txt2img(a1111, "a photo", None)
    st = a1111.ok("GET", "/seqlora/v1/train/status")
    assert st["state"] == "done", st  # the generation ran only after the training had finished
    assert st["finished"] is not None
