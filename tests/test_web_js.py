"""The ComfyUI frontend extension (web/seqlora.js), run under Node with stub ComfyUI modules.

Checks the syntax, that it registers one extension even when the file is served twice, and that its
'name:strength' parsing agrees with the selection grammar every Python front end reads
(seqlora_core/method/selection.py). Skipped without `node`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from seqlora_core.method.selection import parse_selection

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "web" / "seqlora.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")

CASES = ["", "dog", "dog:0.5, cat:1.25", "!dog:0.7, cat", " a b : 2 ,, !c:0 ", "x:y:0.3"]

RUNNER = r"""
import { registered } from "./scripts/app.js";
const a = await import("./extensions/seqlora/seqlora.js");
await import("./extensions/seqlora/seqlora.js?again=1");  // the same file served under a second name
const cases = JSON.parse(process.argv[2]);
const out = {
  registered: registered.map((e) => e.name),
  hooks: registered.map((e) => Object.keys(e).sort()),
  parsed: cases.map((c) => a.parseConcepts(c).map((x) => [x.name, x.strength, x.enabled])),
  roundtrip: cases.map((c) => a.formatConcepts(a.parseConcepts(c))),
  merged: a.mergeConcepts([{name: "dog", triggers: ["sks dog"]}, {name: "cat"}], "dog:0.5"),
  mergedAll: a.mergeConcepts([{name: "dog"}, {name: "cat"}], ""),
};
const st = {points: [], total: 0};
a.addLossPoint(st, {step: 1, total: 5, loss: 1.0});
a.addLossPoint(st, {step: 2, total: 5, loss: 0.5});
out.points = st.points.length;
a.addLossPoint(st, {step: 1, total: 5, loss: 0.9});  // a new run restarts the chart
out.afterRestart = st.points.length;
out.status = st.status;
const st2 = {points: [], total: 0};
a.setNote(st2, "measuring the base model", "phase");
out.phaseBefore = st2.note;
a.addLossPoint(st2, {step: 1, total: 3, loss: 1.0});  // the first loss point ends a phase's line
out.phaseAfter = st2.note;
a.setNote(st2, "settings changed: training restarts from step 1");
a.addLossPoint(st2, {step: 2, total: 3, loss: 0.8});  // a notice stays
out.notice = st2.note;
console.log(JSON.stringify(out));
"""

APP_STUB = "export const registered = [];\nexport const app = { registerExtension(e) { registered.push(e); } };\n"
API_STUB = (
    "export const api = { addEventListener() {}, fetchApi: async () => ({ ok: false, json: async () => ({}) }) };\n"
)


def test_syntax() -> None:
    subprocess.run([NODE, "--check", str(JS)], check=True, capture_output=True, text=True)


def test_registers_once_and_parses_like_python(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "api.js").write_text(API_STUB)
    ext = tmp_path / "extensions" / "seqlora"
    ext.mkdir(parents=True)
    shutil.copy(JS, ext / "seqlora.js")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "run.mjs").write_text(RUNNER)
    res = subprocess.run([NODE, "run.mjs", json.dumps(CASES)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["registered"] == ["SeqLoRA.UI"]
    assert {"setup", "beforeRegisterNodeDef"} <= set(out["hooks"][0])

    for case, js in zip(CASES, out["parsed"], strict=True):
        py = [[n, s, on] for n, s, on in parse_selection(case)]
        assert js == py, case
    for case, js in zip(CASES, out["roundtrip"], strict=True):
        assert parse_selection(js) == parse_selection(case)

    assert out["merged"] == [
        {"name": "dog", "triggers": ["sks dog"], "strength": 0.5, "enabled": True},
        {"name": "cat", "triggers": [], "strength": 1.0, "enabled": False},
    ]
    assert all(c["enabled"] and c["strength"] == 1.0 for c in out["mergedAll"])
    assert out["points"] == 2 and out["afterRestart"] == 1 and out["status"].startswith("step 1/5")
    assert out["phaseBefore"] == "measuring the base model" and out["phaseAfter"] == ""
    assert out["notice"].startswith("settings changed")
