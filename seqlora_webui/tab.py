"""The "SeqLoRA" tab: train a concept into a bank, and manage banks (concepts, import, export, report)."""

from __future__ import annotations

import html
import logging
from typing import Any

from . import service, training, views
from ._core import METHODS, PRESETS, heatmap_image
from .training import TrainRequest

log = logging.getLogger("seqlora")
REFRESH = "\U0001f504"


def _bank_choices() -> list[str]:
    try:
        return service.folder().list()
    except OSError:
        return []


def show_bank(name: str) -> str:
    if not name:
        return views.ok_html("choose a bank, or type a new bank name and train a concept to create it")
    try:
        return views.bank_table(service.bank_info(name))
    except FileNotFoundError:
        return views.ok_html(f"{name} does not exist yet: train a concept (or import a LoRA) to create it")
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return views.error_html(msg)


def _request(
    bank,
    name,
    triggers,
    images,
    caption_template,
    method,
    rank,
    steps,
    lr,
    budget,
    targets,
    resolution,
    batch_size,
    seed,
    checkpoint_every,
) -> TrainRequest:
    return TrainRequest(
        bank=str(bank or ""),
        name=str(name or ""),
        triggers=str(triggers or ""),
        images=str(images or ""),
        caption_template=str(caption_template or "a photo of {trigger}"),
        method=str(method),
        rank=int(rank),
        steps=int(steps),
        lr=float(lr),
        budget=float(budget),
        targets=str(targets),
        resolution=int(resolution),
        batch_size=int(batch_size),
        seed=int(seed),
        checkpoint_every=int(checkpoint_every),
    )


def train(id_task: str, *fields: Any) -> tuple[Any, str]:
    """The Train button (inside the host's ``wrap_gradio_gpu_call``): (bank view, result)."""
    try:
        req = _request(*fields)
        msg = training.run(req, service.folder(), _lora_dir())
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return show_bank(str(fields[0] or "")), views.error_html(msg)
    return show_bank(service.folder().new_name(req.bank)), views.ok_html(msg)


def resume(id_task: str, bank: str, name: str) -> tuple[Any, str]:
    """The Resume button: run the saved settings of the interrupted training of bank/name (or the latest)."""
    try:
        req = training.saved_job(service.folder(), str(bank or ""), str(name or ""))
        msg = training.run(req, service.folder(), _lora_dir())
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return show_bank(str(bank or "")), views.error_html(msg)
    return show_bank(service.folder().new_name(req.bank)), views.ok_html(msg)


def _lora_dir():
    from . import host

    return host.lora_dir()


def do_import(bank: str, lora: str, name: str, triggers: str) -> tuple[str, str]:
    try:
        msg = service.import_into(str(bank or ""), str(lora or ""), str(name or ""), str(triggers or ""))
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return show_bank(bank), views.error_html(msg)
    return show_bank(service.folder().new_name(bank)), views.ok_html(msg)


def do_export(bank: str, concepts: str, dtype: str) -> tuple[str, str]:
    try:
        names = [c.strip() for c in str(concepts or "").split(",") if c.strip()]
        files = service.export(str(bank or ""), names or None, str(dtype))
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return show_bank(bank), views.error_html(msg)
    lines = "".join(
        f"<li><code>&lt;lora:{html.escape(f['network'])}:1&gt;</code> "
        f"{'written' if f['written'] else 'already current'}: {html.escape(f['path'])}</li>"
        for f in files
    )
    return show_bank(bank), f"<div class='seqlora-ok'>exported {len(files)} concept(s):<ul>{lines}</ul></div>"


def do_report(bank: str) -> tuple[Any, str]:
    try:
        rep = service.report(str(bank or ""))
        img = heatmap_image(rep) if len(rep["concepts"]) else None
        text = views.report_html(rep, service.report_pairs(rep))
    except Exception as e:
        msg = service.user_error(e)
        if msg is None:
            raise
        return None, views.error_html(msg)
    return img, text


def build() -> Any:
    """The tab's gr.Blocks (called from ``on_ui_tabs``)."""
    import gradio as gr
    from modules.call_queue import wrap_gradio_gpu_call
    from modules.ui_components import ToolButton

    from . import host

    choices = _bank_choices()
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel", elem_id="seqlora_train_column"):
                gr.HTML(
                    "<h3>Train a concept</h3><p class='seqlora-muted'>on the loaded checkpoint, into a bank "
                    f"in <code>{html.escape(host.banks_dir_label())}</code></p>"
                )
                with gr.Row():
                    bank = gr.Dropdown(
                        label="Bank (choose, or type a new name)",
                        choices=choices,
                        value=choices[0] if choices else None,
                        allow_custom_value=True,
                        elem_id="seqlora_bank",
                    )
                    refresh = ToolButton(value=REFRESH, elem_id="seqlora_bank_refresh")
                with gr.Row():
                    name = gr.Textbox(label="Concept name", placeholder="my_dog", elem_id="seqlora_name")
                    triggers = gr.Textbox(label="Trigger words", placeholder="sks dog", elem_id="seqlora_triggers")
                images = gr.Textbox(
                    label="Image folder",
                    placeholder="/path/to/images (kohya N_name folders work)",
                    elem_id="seqlora_images",
                )
                caption = gr.Textbox(
                    label="Caption for images without a .txt", value="a photo of {trigger}", elem_id="seqlora_caption"
                )
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        method = gr.Dropdown(
                            label="Method", choices=list(METHODS), value="seqlora", elem_id="seqlora_method"
                        )
                        targets = gr.Dropdown(
                            label="Layers", choices=list(PRESETS), value="attn", elem_id="seqlora_targets"
                        )
                        rank = gr.Number(label="Rank", value=4, precision=0, elem_id="seqlora_rank")
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=500, precision=0, elem_id="seqlora_steps")
                        lr = gr.Number(label="Learning rate", value=1e-4, elem_id="seqlora_lr")
                        budget = gr.Number(label="Interference budget", value=0.05, elem_id="seqlora_budget")
                    with gr.Row():
                        resolution = gr.Number(label="Resolution", value=512, precision=0, elem_id="seqlora_resolution")
                        batch = gr.Number(label="Batch size", value=1, precision=0, elem_id="seqlora_batch")
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seqlora_seed")
                        every = gr.Number(
                            label="Save progress every (steps)", value=50, precision=0, elem_id="seqlora_every"
                        )
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="seqlora_train")
                    interrupt_btn = gr.Button("Interrupt", elem_id="seqlora_interrupt")
                    resume_btn = gr.Button("Resume", elem_id="seqlora_resume")
                task_id = gr.Textbox(visible=False, elem_id="seqlora_task_id")
                gr.HTML(elem_id="seqlora_train_progress")  # javascript/seqlora.js writes the progress here
                result = gr.HTML(elem_id="seqlora_train_result")
            with gr.Column(variant="panel", elem_id="seqlora_bank_column"):
                gr.HTML("<h3>Bank</h3>")
                bank_view = gr.HTML(show_bank(choices[0]) if choices else show_bank(""), elem_id="seqlora_bank_view")
                with gr.Accordion("Import a LoRA as a frozen concept", open=False):
                    with gr.Row():
                        imp_file = gr.Textbox(
                            label="LoRA file (name in the Lora folder, or a full path)", elem_id="seqlora_import_file"
                        )
                        imp_name = gr.Textbox(label="Concept name", elem_id="seqlora_import_name")
                        imp_trig = gr.Textbox(label="Trigger words (optional)", elem_id="seqlora_import_triggers")
                    imp_btn = gr.Button("Import", elem_id="seqlora_import")
                with gr.Accordion("Export concepts as LoRA files", open=False):
                    with gr.Row():
                        exp_names = gr.Textbox(
                            label="Concepts (comma-separated; empty = all)", elem_id="seqlora_export_concepts"
                        )
                        exp_dtype = gr.Dropdown(
                            label="Precision",
                            choices=["fp32", "fp16", "bf16"],
                            value="fp32",
                            elem_id="seqlora_export_dtype",
                        )
                    exp_btn = gr.Button("Export", elem_id="seqlora_export")
                with gr.Accordion("Interference report", open=False):
                    rep_btn = gr.Button("Show report", elem_id="seqlora_report")
                    rep_img = gr.Image(
                        label="relative interference R(t->j)/R(t->t)",
                        type="pil",
                        interactive=False,
                        elem_id="seqlora_report_image",
                    )
                    rep_text = gr.HTML(elem_id="seqlora_report_text")
                manage_result = gr.HTML(elem_id="seqlora_manage_result")

        fields = [
            bank,
            name,
            triggers,
            images,
            caption,
            method,
            rank,
            steps,
            lr,
            budget,
            targets,
            resolution,
            batch,
            seed,
            every,
        ]

        def refresh_banks(current):
            new = _bank_choices()
            return gr.update(choices=new, value=current if current else (new[0] if new else None))

        refresh.click(fn=refresh_banks, inputs=[bank], outputs=[bank])
        bank.change(fn=show_bank, inputs=[bank], outputs=[bank_view])
        train_btn.click(
            fn=wrap_gradio_gpu_call(train, extra_outputs=[gr.update()]),
            _js="seqlora_start_training",
            inputs=[task_id, *fields],
            outputs=[bank_view, result],
        )
        resume_btn.click(
            fn=wrap_gradio_gpu_call(resume, extra_outputs=[gr.update()]),
            _js="seqlora_start_training",
            inputs=[task_id, bank, name],
            outputs=[bank_view, result],
        )
        interrupt_btn.click(fn=lambda: host.state().interrupt(), inputs=[], outputs=[])
        imp_btn.click(fn=do_import, inputs=[bank, imp_file, imp_name, imp_trig], outputs=[bank_view, manage_result])
        exp_btn.click(fn=do_export, inputs=[bank, exp_names, exp_dtype], outputs=[bank_view, manage_result])
        rep_btn.click(fn=do_report, inputs=[bank], outputs=[rep_img, rep_text])
    return blocks
