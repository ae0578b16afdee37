"""SeqLoRA for Automatic1111 and Forge: the "SeqLoRA" tab, the txt2img/img2img accordion and the API.

The web UI loads this file with the extension folder on ``sys.path`` and restores ``sys.path`` right
after, so every package this extension needs is imported here, at load time.
"""

import logging

import gradio as gr
from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion, ToolButton

import seqlora_core  # noqa: F401  (import now: sys.path loses the extension folder after this file loads)
from seqlora_webui import accordion, api, tab
from seqlora_webui.host import host_name

log = logging.getLogger("seqlora")


class SeqLoRAScript(scripts.Script):
    """The always-visible accordion: its values are (enabled, bank, selection)."""

    def title(self):
        return "SeqLoRA"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        where = "img2img" if is_img2img else "txt2img"
        choices = accordion.bank_choices()
        with InputAccordion(False, label="SeqLoRA", elem_id=f"seqlora_{where}") as enabled:
            with gr.Row():
                bank = gr.Dropdown(
                    label="Bank",
                    choices=choices,
                    value=choices[0] if choices else None,
                    elem_id=f"seqlora_{where}_bank",
                )
                refresh = ToolButton(value="\U0001f504", elem_id=f"seqlora_{where}_refresh")
            concepts = gr.Textbox(
                label="Concepts (name:strength, !off:strength)",
                lines=1,
                elem_id=f"seqlora_{where}_concepts",
                elem_classes=["seqlora-concepts"],
            )
            picker = gr.HTML(
                accordion.initial_picker(choices[0] if choices else None), elem_id=f"seqlora_{where}_picker"
            )
            info = gr.HTML(elem_id=f"seqlora_{where}_info")

        def refresh_banks(current):
            new = accordion.bank_choices()
            return gr.update(choices=new, value=current if current in new else (new[0] if new else None))

        refresh.click(fn=refresh_banks, inputs=[bank], outputs=[bank])
        bank.change(fn=accordion.on_bank_change, inputs=[bank, concepts], outputs=[concepts, picker, info])
        concepts.change(fn=accordion.on_concepts_change, inputs=[bank, concepts], outputs=[info])
        self.infotext_fields = accordion.infotext_fields(enabled, bank, concepts)
        self.paste_field_names = ["SeqLoRA"]
        return [enabled, bank, concepts]

    def process(self, p, enabled=False, bank="", concepts=""):
        accordion.process(p, enabled, bank, concepts)


def _on_ui_tabs():
    return [(tab.build(), "SeqLoRA", "seqlora_tab")]


def _on_app_started(_demo, app):
    api.register(app)


def _on_ui_settings():
    from modules import shared

    section = ("seqlora", "SeqLoRA")
    shared.opts.add_option(
        "seqlora_export_dtype",
        shared.OptionInfo(
            "fp32",
            "Precision of exported concept files",
            gr.Radio,
            {"choices": ["fp32", "fp16", "bf16"]},
            section=section,
        ),
    )


script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_ui_tabs(_on_ui_tabs)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_infotext_pasted(accordion.infotext_pasted)
log.info("SeqLoRA %s loaded in %s", seqlora_core.__version__, host_name())
