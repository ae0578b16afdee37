"""HTML pieces the tab and the accordion show (plain functions of data, testable without a host)."""

from __future__ import annotations

import html
import math
from typing import Any


def error_html(message: str) -> str:
    return f"<div class='seqlora-error'><b>SeqLoRA:</b> {html.escape(message)}</div>"


def ok_html(message: str) -> str:
    return f"<div class='seqlora-ok'>{html.escape(message)}</div>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4f}"
    return html.escape("" if v is None else str(v))


def bank_table(info: dict[str, Any]) -> str:
    """Concepts with triggers, method, rank, steps and export state; the bank's capacity below."""
    rows = []
    for i, c in enumerate(info.get("concepts", [])):
        exported = "yes" if c.get("exported") else "no"
        rows.append(
            f"<tr><td>{i}</td><td>{html.escape(c['name'])}</td><td>{html.escape(', '.join(c['triggers']))}</td>"
            f"<td>{html.escape(str(c.get('method')))}</td><td>{c.get('rank')}</td><td>{_fmt(c.get('steps'))}</td>"
            f"<td>{html.escape(str(c.get('source')))}</td><td>{exported}</td></tr>"
        )
    cap = info.get("capacity") or {}
    fullest = cap.get("fullest", 0.0)
    cap_line = (
        f"capacity: fullest layer {fullest:.0%} used ({cap.get('used', 0)} of {cap.get('total', 0)} dims"
        f"{', ' + html.escape(str(cap.get('fullest_layer'))) if cap.get('fullest_layer') else ''}); "
        f"{cap.get('full_layers', 0)} of {cap.get('layers', 0)} layers full"
    )
    head = (
        f"<p><b>{html.escape(info.get('bank', ''))}</b>: {len(info.get('concepts', []))} concepts, "
        f"{html.escape(str(info.get('architecture')))}, {info.get('layers')} layers "
        f"({html.escape(str(info.get('layer_naming')))} names)</p>"
    )
    table = (
        "<table class='seqlora-table'><thead><tr><th>#</th><th>concept</th><th>triggers</th><th>method</th>"
        "<th>rank</th><th>steps</th><th>source</th><th>exported</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    return f"<div class='seqlora-bank'>{head}{table}<p>{cap_line}</p></div>"


def report_html(rep: dict[str, Any], pairs: list[dict[str, Any]]) -> str:
    """Every pair in both directions, the base drift and the forgetting bound's matrix."""
    names = rep["concepts"]
    if len(names) < 2:
        return ok_html("the interference report needs at least two concepts in the bank")
    rows = "".join(
        f"<tr><td>{html.escape(p['a'])}</td><td>{html.escape(p['b'])}</td><td>{_fmt(p['a_on_b'])}</td>"
        f"<td>{_fmt(p['b_on_a'])}</td></tr>"
        for p in pairs
    )
    drift = ", ".join(f"{html.escape(n)} {_fmt(d)}" for n, d in zip(names, rep["base_drift"], strict=True))
    return (
        f"<div class='seqlora-report'><p>mean relative interference {_fmt(rep['mean_relative_interference'])} "
        "(R(a&rarr;b): the energy a's change adds on b's activations, relative to its energy on a's own)</p>"
        "<table class='seqlora-table'><thead><tr><th>a</th><th>b</th><th>a &rarr; b</th><th>b &rarr; a</th></tr>"
        f"</thead><tbody>{rows}</tbody></table><p>base drift: {drift}</p></div>"
    )


def selection_info(concepts: list[dict[str, Any]], active: dict[str, float]) -> str:
    """The accordion's line under the picker: the triggers of the concepts that are on."""
    if not concepts:
        return "<span class='seqlora-muted'>no concepts in this bank</span>"
    on = [c for c in concepts if c["name"] in active]
    if not on:
        return "<span class='seqlora-muted'>no concept is on</span>"
    parts = [
        f"<b>{html.escape(c['name'])}</b> {active[c['name']]:g}: {html.escape(', '.join(c['triggers']))}" for c in on
    ]
    return "<span class='seqlora-triggers'>triggers: " + "; ".join(parts) + "</span>"
