// SeqLoRA frontend extension for ComfyUI.
//
// - SeqLoRA Train Concept: a live loss chart drawn on the node, fed by the websocket event
//   "seqlora.loss" ({node, step, total, loss}) that the node sends while it trains; the event
//   "seqlora.status" ({node, text}) and the node's text output (e.g. that changed settings restart a
//   cancelled training) show as a line under the chart's title.
// - SeqLoRA Multi-Concept Loader: the bank's concepts with their trigger words, a checkbox and a
//   strength each. The list comes from GET /seqlora/bank_info?file=<bank file> (or, for a linked
//   bank, from the node's last execution); editing it rewrites the node's `concepts` text widget
//   ("name:strength, !off:strength"), which is what the workflow stores and the Python node reads.
// - Nodes that report text (image folder, save, export, report) show it under their widgets; the
//   report's heatmap is shown by ComfyUI itself (ui images).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "SeqLoRA.UI";
const TRAIN = "SeqLoRATrainConcept";
const LOADER = "SeqLoRAMultiConceptLoader";
const TEXT_NODES = new Set(["SeqLoRAImageFolder", "SeqLoRASaveBank", "SeqLoRAExportLoRA", "SeqLoRAInterferenceReport"]);
const LINKED_BANK = "(linked bank)";
const CHART_HEIGHT = 130;

// ---------------------------------------------------------------- concepts text <-> list

export function parseConcepts(text) {
  const out = [];
  for (const raw of String(text || "").replace(/\n/g, ",").split(",")) {
    let item = raw.trim();
    if (!item) continue;
    const enabled = !item.startsWith("!");
    item = item.replace(/^!+/, "").trim();
    const i = item.lastIndexOf(":");
    let name = item;
    let strength = 1.0;
    if (i >= 0) {
      name = item.slice(0, i).trim();
      const v = parseFloat(item.slice(i + 1));
      strength = Number.isFinite(v) ? v : 1.0;
    }
    if (name) out.push({ name, strength, enabled });
  }
  return out;
}

export function formatConcepts(items) {
  const num = (v) => String(Math.round(v * 1000) / 1000);
  return items.map((c) => `${c.enabled ? "" : "!"}${c.name}:${num(c.strength)}`).join(", ");
}

// The list shown by the loader: every concept of the bank, with the state the text gives it.
export function mergeConcepts(bankConcepts, text) {
  const given = parseConcepts(text);
  const byName = new Map(given.map((c) => [c.name, c]));
  const all = given.length === 0;
  return bankConcepts.map((c) => {
    const g = byName.get(c.name);
    return {
      name: c.name,
      triggers: c.triggers || [],
      strength: g ? g.strength : 1.0,
      enabled: all ? true : g ? g.enabled : false,
    };
  });
}

// ---------------------------------------------------------------- loss chart

function lossState(node) {
  if (!node.__seqloraLoss) node.__seqloraLoss = { points: [], total: 0, status: "waiting for training", note: "" };
  return node.__seqloraLoss;
}

// A line under the chart's title: a phase ("measuring the base model", cleared by the first loss point)
// or a notice (e.g. a restart after changed settings; it stays until the next run's notices).
export function setNote(state, text, kind = "notice") {
  state.note = String(text ?? "");
  state.noteKind = kind;
  return state;
}

export function addLossPoint(state, detail) {
  const step = Number(detail.step);
  const last = state.points.length ? state.points[state.points.length - 1][0] : 0;
  if (step <= 1 || step <= last) state.points = []; // a new run, or a resume from a checkpoint
  if (state.noteKind === "phase") setNote(state, "", "");
  if (detail.loss !== null && detail.loss !== undefined && Number.isFinite(Number(detail.loss))) {
    state.points.push([step, Number(detail.loss)]);
  }
  state.total = Number(detail.total) || state.total;
  state.status = `step ${step}/${state.total}` +
    (state.points.length ? `  loss ${state.points[state.points.length - 1][1].toFixed(4)}` : "");
  return state;
}

function drawChart(ctx, node, width, y) {
  const st = lossState(node);
  const m = 10;
  const w = width - 2 * m;
  const h = CHART_HEIGHT - 12;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.strokeStyle = "#444";
  ctx.beginPath();
  ctx.rect(m, y + 4, w, h);
  ctx.fill();
  ctx.stroke();
  ctx.fillStyle = "#bbb";
  ctx.font = "11px sans-serif";
  ctx.fillText(`loss  ${st.status}`, m + 6, y + 18);
  if (st.note) {
    ctx.fillStyle = "#e0b050";
    let note = st.note;
    while (note.length > 4 && ctx.measureText(note).width > w - 12) note = note.slice(0, -4) + "...";
    ctx.fillText(note, m + 6, y + 32);
  }
  const pts = st.points;
  if (pts.length >= 2) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const [, v] of pts) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    if (hi - lo < 1e-12) hi = lo + 1e-12;
    const x0 = pts[0][0];
    const span = Math.max(1, Math.max(st.total, pts[pts.length - 1][0]) - x0);
    const top = y + (st.note ? 40 : 26);
    const plotH = h - (st.note ? 44 : 30);
    ctx.strokeStyle = "#4fc3f7";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    pts.forEach(([s, v], i) => {
      const px = m + 6 + ((s - x0) / span) * (w - 12);
      const py = top + (1 - (v - lo) / (hi - lo)) * plotH;
      if (i === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
    ctx.fillStyle = "#888";
    ctx.fillText(hi.toPrecision(3), m + w - 60, top + 8);
    ctx.fillText(lo.toPrecision(3), m + w - 60, top + plotH);
  }
  ctx.restore();
}

function addChartWidget(node) {
  const widget = {
    name: "seqlora_loss_chart",
    type: "seqlora_chart",
    value: null,
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      drawChart(ctx, n, width, y);
    },
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
  };
  if (node.addCustomWidget) node.addCustomWidget(widget);
  else (node.widgets ||= []).push(widget);
  return widget;
}

// ---------------------------------------------------------------- loader concept list

function widgetByName(node, name) {
  return (node.widgets || []).find((w) => w.name === name);
}

function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
}

function renderConceptList(node) {
  const box = node.__seqloraListEl;
  if (!box) return;
  const textWidget = widgetByName(node, "concepts");
  const bankConcepts = node.__seqloraBank || [];
  box.replaceChildren();
  if (!bankConcepts.length) {
    box.appendChild(el("div", { className: "seqlora-empty", textContent: node.__seqloraBankStatus || "no bank" }));
    return;
  }
  const items = mergeConcepts(bankConcepts, textWidget ? textWidget.value : "");
  const commit = () => {
    if (!textWidget) return;
    textWidget.value = formatConcepts(items);
    node.__seqloraCommitting = true;
    try {
      textWidget.callback?.(textWidget.value);
    } finally {
      node.__seqloraCommitting = false;
    }
    node.setDirtyCanvas?.(true, true);
  };
  for (const item of items) {
    const check = el("input", { type: "checkbox", checked: item.enabled, title: "use this concept" });
    check.addEventListener("change", () => {
      item.enabled = check.checked;
      commit();
    });
    const strength = el("input", {
      type: "number", step: "0.05", value: String(item.strength), title: "strength", className: "seqlora-strength",
    });
    strength.addEventListener("change", () => {
      const v = parseFloat(strength.value);
      if (Number.isFinite(v)) item.strength = v;
      commit();
    });
    const label = el("span", { className: "seqlora-name", textContent: item.name });
    const trig = el("span", { className: "seqlora-triggers", textContent: item.triggers.join(", ") });
    box.appendChild(el("div", { className: "seqlora-row" }, [check, label, trig, strength]));
  }
}

async function fetchBankInfo(node) {
  const fileWidget = widgetByName(node, "bank_file");
  const file = fileWidget ? fileWidget.value : LINKED_BANK;
  if (!file || file === LINKED_BANK) {
    if (!node.__seqloraLinkedSeen) {
      node.__seqloraBank = [];
      node.__seqloraBankStatus = "linked bank: the concepts show after the first run";
    }
    renderConceptList(node);
    return;
  }
  try {
    const res = await api.fetchApi(`/seqlora/bank_info?file=${encodeURIComponent(file)}`);
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    node.__seqloraBank = data.concepts || [];
    node.__seqloraBankStatus = node.__seqloraBank.length ? "" : "the bank has no concepts";
  } catch (err) {
    node.__seqloraBank = [];
    node.__seqloraBankStatus = `cannot read ${file}: ${err.message || err}`;
  }
  renderConceptList(node);
}

function addConceptList(node) {
  const box = el("div", { className: "seqlora-concepts" });
  node.__seqloraListEl = box;
  if (node.addDOMWidget) {
    const w = node.addDOMWidget("seqlora_concept_list", "seqlora_concepts", box, {
      serialize: false,
      hideOnZoom: false,
      getValue() {
        return undefined;
      },
      setValue() {},
    });
    w.serialize = false;
    w.computeSize = (width) => [width, Math.max(44, 26 * ((node.__seqloraBank || []).length || 1) + 20)];
  }
  const fileWidget = widgetByName(node, "bank_file");
  if (fileWidget) {
    const cb = fileWidget.callback;
    fileWidget.callback = function (...args) {
      const r = cb?.apply(this, args);
      fetchBankInfo(node);
      return r;
    };
  }
  const textWidget = widgetByName(node, "concepts");
  if (textWidget) {
    const cb = textWidget.callback;
    textWidget.callback = function (...args) {
      const r = cb?.apply(this, args);
      if (!node.__seqloraCommitting) renderConceptList(node);
      return r;
    };
  }
}

// ---------------------------------------------------------------- text output

function showText(node, text) {
  if (!node.__seqloraTextEl) {
    const area = el("textarea", { readOnly: true, className: "seqlora-text" });
    node.__seqloraTextEl = area;
    if (node.addDOMWidget) {
      const w = node.addDOMWidget("seqlora_text", "seqlora_text", area, { serialize: false, getValue() {}, setValue() {} });
      w.serialize = false;
    }
  }
  node.__seqloraTextEl.value = text;
}

const STYLE = `
.seqlora-concepts { font: 12px sans-serif; color: var(--input-text, #ddd); overflow-y: auto; }
.seqlora-row { display: flex; align-items: center; gap: 6px; padding: 2px 4px; }
.seqlora-name { font-weight: 600; }
.seqlora-triggers { opacity: 0.7; flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.seqlora-strength { width: 56px; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #555; }
.seqlora-empty { opacity: 0.7; padding: 4px; }
.seqlora-text { width: 100%; height: 100%; font: 11px monospace; background: var(--comfy-input-bg, #222);
  color: var(--input-text, #ddd); border: none; resize: none; }
`;

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  return graph.getNodeById(id) ?? graph.getNodeById(Number(id)) ?? null;
}

// ---------------------------------------------------------------- registration

if (!globalThis.__seqloraUiRegistered) {
  globalThis.__seqloraUiRegistered = true; // the pack's web folder may be listed under two names
  app.registerExtension({
    name: EXT,

    setup() {
      const style = document.createElement("style");
      style.textContent = STYLE;
      document.head.appendChild(style);
      api.addEventListener("seqlora.loss", ({ detail }) => {
        const node = detail ? findNode(detail.node) : null;
        if (!node) return;
        addLossPoint(lossState(node), detail);
        node.setDirtyCanvas?.(true, false);
      });
      api.addEventListener("seqlora.status", ({ detail }) => {
        const node = detail ? findNode(detail.node) : null;
        if (!node) return;
        setNote(lossState(node), detail.text, detail.kind || "notice");
        node.setDirtyCanvas?.(true, false);
      });
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
      const name = nodeData?.name;
      if (name === TRAIN) {
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
          const r = created?.apply(this, arguments);
          addChartWidget(this);
          return r;
        };
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = executed?.apply(this, arguments);
          const text = [].concat(message?.text ?? []).join(" ");
          if (text) {
            setNote(lossState(this), text);
            this.setDirtyCanvas?.(true, false);
          }
          return r;
        };
      } else if (name === LOADER) {
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
          const r = created?.apply(this, arguments);
          addConceptList(this);
          setTimeout(() => fetchBankInfo(this), 0);
          return r;
        };
        const configure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
          const r = configure?.apply(this, arguments);
          setTimeout(() => fetchBankInfo(this), 0);
          return r;
        };
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = executed?.apply(this, arguments);
          if (message?.seqlora_concepts) {
            this.__seqloraBank = message.seqlora_concepts;
            this.__seqloraLinkedSeen = true;
            this.__seqloraBankStatus = "";
            renderConceptList(this);
          }
          return r;
        };
      } else if (TEXT_NODES.has(name)) {
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = executed?.apply(this, arguments);
          if (message?.text) showText(this, [].concat(message.text).join("\n"));
          return r;
        };
      }
    },
  });
}
