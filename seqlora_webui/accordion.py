"""The "SeqLoRA" accordion in txt2img/img2img: pick a bank, tick concepts, set strengths.

Composition goes through the host's built-in Lora network: the ticked concepts are exported (when
stale) to ``<lora dir>/seqlora/`` and ``<lora:...>`` tags are appended to the prompts before the host
parses extra networks, so ``<lora:a:1> <lora:b:0.7>`` patches every layer to base + the sum of the
concepts' deltas, which is SeqLoRA's composition. The selection is one text field
(``name:strength, !off:strength``), recorded in the infotext as ``SeqLoRA: "bank: selection"``.
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from . import exports, host, service, training, views
from ._core import (
    BankError,
    BankMismatchError,
    check_bank_fits,
    diffusers_to_ldm_map,
    guess_structure,
    parse_concepts,
)
from .selection import INFOTEXT_KEY, active, add_tags, infotext_value, parse_infotext_value, strip_tags
from .shapes import check_fits

log = logging.getLogger("seqlora")
ERROR_KEY = "SeqLoRA error"


def bank_choices() -> list[str]:
    try:
        return service.folder().list()
    except OSError:
        return []


def _concepts(bank: str) -> list[dict[str, Any]]:
    if not bank:
        return []
    return service.folder().summary(bank)["concepts"]


def picker_html(bank: str, concepts: list[dict[str, Any]] | None = None, error: str | None = None) -> str:
    """The concept list; ``javascript/seqlora.js`` turns it into checkboxes and strength sliders."""
    if error:
        return views.error_html(error)
    if not bank:
        return "<div class='seqlora-picker seqlora-muted'>choose a bank (train one in the SeqLoRA tab)</div>"
    data = html.escape(json.dumps([{"name": c["name"], "triggers": c["triggers"]} for c in concepts or []]))
    rows = "".join(
        f"<li>{html.escape(c['name'])} <span class='seqlora-muted'>{html.escape(', '.join(c['triggers']))}</span></li>"
        for c in concepts or []
    )
    return f'<div class=\'seqlora-picker\' data-bank="{html.escape(bank)}" data-concepts="{data}"><ul>{rows}</ul></div>'


def initial_picker(bank: str | None) -> str:
    """The picker as the page first shows it (for the bank the dropdown starts on)."""
    if not bank:
        return picker_html("")
    try:
        return picker_html(bank, _concepts(bank))
    except Exception as e:
        return picker_html(bank, error=service.user_error(e) or str(e))


def on_bank_change(bank: str, concepts: str) -> tuple[str, str, str]:
    """(selection, picker, info) for a newly chosen bank: a selection naming none of its concepts becomes all on."""
    try:
        cs = _concepts(bank)
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return concepts, picker_html(bank, error=msg), ""
    names = {c["name"] for c in cs}
    try:
        items = parse_concepts(concepts or "")
    except ValueError:
        items = []
    if not any(n in names for n, _, _ in items):
        concepts = ", ".join(f"{c['name']}:1" for c in cs)
        items = parse_concepts(concepts)
    return concepts, picker_html(bank, cs), views.selection_info(cs, active(items))


def on_concepts_change(bank: str, concepts: str) -> str:
    try:
        return views.selection_info(_concepts(bank), active(parse_concepts(concepts or "")))
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return views.error_html(msg)


def _check_against_model(bank: Any, bank_name: str) -> None:
    """BankMismatchError when the bank's layers are not the loaded model's (the LoRA would not apply)."""
    model = host.sd_model()
    arch = host.architecture(model)
    try:
        check_bank_fits(bank.architecture, arch)
    except BankMismatchError:
        raise BankMismatchError(
            f"{bank_name} was trained on {bank.architecture}, the loaded checkpoint is {arch}; "
            "load the checkpoint the bank was trained on"
        ) from None
    if bank.layer_naming == "diffusers":
        bank = bank.renamed_layers(diffusers_to_ldm_map(guess_structure(s.name for s in bank.layers)), "ldm")
    if bank.layer_naming == "ldm":
        check_fits(bank, host.diffusion_model(model))


def compose(p: Any, bank_name: str, selection: str) -> dict[str, float]:
    """Export what is stale and append the tags to every prompt of `p`; returns network -> strength."""
    want = active(parse_concepts(selection))
    if not want:
        return {}
    banks = service.folder()
    path = banks.resolve(bank_name)
    rel = path.relative_to(banks.root).as_posix()
    bank = banks.load(rel)
    unknown = [n for n in want if n not in bank.names()]
    if unknown:
        raise ValueError(
            f"concepts {', '.join(map(repr, unknown))} are not in {rel}; it has: "
            f"{', '.join(bank.names()) or 'no concepts'}"
        )
    _check_against_model(bank, rel)
    done = training.sync_exports(banks, rel, host.lora_dir(), list(want))
    nets = {e.network: want[e.concept] for e in done}
    prefix = exports.bank_prefix(rel)
    p.all_prompts = [add_tags(x, nets, prefix) for x in p.all_prompts]
    if getattr(p, "all_hr_prompts", None):
        p.all_hr_prompts = [add_tags(x, nets, prefix) for x in p.all_hr_prompts]
    p.extra_generation_params[INFOTEXT_KEY] = infotext_value(rel, selection)
    return nets


def process(p: Any, enabled: bool, bank: str, selection: str) -> None:
    """The script's ``process``: compose, or stop the job with a message that says what to fix."""
    if not enabled:
        return
    try:
        compose(p, str(bank or ""), str(selection or ""))
    except (BankError, ValueError, KeyError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = service.user_error(e) or str(e)
        log.error("SeqLoRA: %s; nothing was generated", msg)
        p.comment(f"SeqLoRA: {msg}")
        p.extra_generation_params[ERROR_KEY] = msg  # shown with the (empty) result in the UI and the API
        host.state().interrupted = True
        try:
            import gradio as gr

            gr.Warning(f"SeqLoRA: {msg}")
        except Exception:  # noqa: S110 (outside a UI request a toast is not possible)
            pass


def infotext_fields(enabled: Any, bank: Any, concepts: Any) -> list[tuple[Any, Any]]:
    """(component, value from the pasted parameters) for "send to txt2img" and PNG info."""

    def parsed(params: dict[str, Any]) -> tuple[str, str] | None:
        value = params.get(INFOTEXT_KEY)
        if not value:
            return None
        try:
            return parse_infotext_value(str(value))
        except ValueError:
            return None

    def bank_value(params: dict[str, Any]) -> Any:
        got = parsed(params)
        return got[0] if got else _unchanged()

    def concepts_value(params: dict[str, Any]) -> Any:
        got = parsed(params)
        return got[1] if got else _unchanged()

    return [(enabled, lambda params: parsed(params) is not None), (bank, bank_value), (concepts, concepts_value)]


def _unchanged() -> Any:
    import gradio as gr

    return gr.update()


def infotext_pasted(_infotext: str, params: dict[str, Any]) -> None:
    """Take this bank's tags out of the pasted prompt: the restored accordion adds them again."""
    value = params.get(INFOTEXT_KEY)
    if not value:
        return
    try:
        bank, _selection = parse_infotext_value(str(value))
    except ValueError:
        return
    prefix = exports.bank_prefix(bank)
    for key in ("Prompt", "Hires prompt"):
        if isinstance(params.get(key), str):
            params[key] = _strip_prefixed(params[key], prefix)


def _strip_prefixed(prompt: str, prefix: str) -> str:
    import re

    names = re.findall(r"<(?:lora|lyco):(" + re.escape(prefix) + r"[^:>]*)", prompt)
    return strip_tags(prompt, names)
