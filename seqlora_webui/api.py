"""HTTP routes under ``/seqlora/v1/`` (added to the host's FastAPI app in ``on_app_started``).

    GET  /seqlora/v1/banks                       banks in the banks folder with their concepts
    GET  /seqlora/v1/bank?name=B                 concepts (triggers, method, rank, exported), capacity
    POST /seqlora/v1/export   {bank, concepts?, dtype?}        LoRA files into <lora dir>/seqlora
    POST /seqlora/v1/import   {bank, lora, name, triggers?}    a LoRA into a bank as a frozen concept
    GET  /seqlora/v1/report?name=B               interference (both directions), bound, capacity
    GET  /seqlora/v1/report.png?name=B           its heatmap
    POST /seqlora/v1/train    {bank, name, triggers, images, ...}  start training (409 while one runs)
    POST /seqlora/v1/train/resume {bank?, name?} resume an interrupted training with its saved settings
    POST /seqlora/v1/train/interrupt             the host's Interrupt
    GET  /seqlora/v1/train/status                state, step, loss, losses, message

Generation stays ``/sdapi/v1/txt2img`` with ``"alwayson_scripts": {"SeqLoRA": {"args": [true, bank, "a:1, b:0.7"]}}``.
Bad input answers 400 (404 for a missing file, 409 when busy) with ``{"error": message}``.
"""

from __future__ import annotations

from typing import Any

from . import host, service, training
from .training import TrainRequest

PREFIX = "/seqlora/v1"


def _status_code(e: BaseException) -> int:
    if isinstance(e, FileNotFoundError):
        return 404
    if isinstance(e, RuntimeError):
        return 409
    return 400


def register(app: Any) -> None:
    from fastapi import Body
    from fastapi.responses import JSONResponse, Response

    def guarded(fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            msg = service.user_error(e)
            if msg is None:
                raise
            return JSONResponse({"error": msg}, status_code=_status_code(e))

    @app.get(PREFIX + "/banks")
    def banks() -> Any:
        return guarded(service.list_banks)

    @app.get(PREFIX + "/bank")
    def bank(name: str) -> Any:
        return guarded(service.bank_info, name)

    @app.post(PREFIX + "/export")
    def export(body: dict = Body(...)) -> Any:  # noqa: B008 (FastAPI's idiom)
        return guarded(
            lambda: {"files": service.export(str(body.get("bank", "")), body.get("concepts"), body.get("dtype"))}
        )

    @app.post(PREFIX + "/import")
    def import_(body: dict = Body(...)) -> Any:  # noqa: B008
        return guarded(
            lambda: {
                "message": service.import_into(
                    str(body.get("bank", "")),
                    str(body.get("lora", "")),
                    str(body.get("name", "")),
                    str(body.get("triggers", "")),
                )
            }
        )

    @app.get(PREFIX + "/report")
    def report(name: str) -> Any:
        def build() -> dict:
            rep = service.report(name)
            return {**rep, "pairs": service.report_pairs(rep)}

        return guarded(build)

    @app.get(PREFIX + "/report.png")
    def report_png(name: str) -> Any:
        out = guarded(service.report_png, name)
        return out if isinstance(out, JSONResponse) else Response(out, media_type="image/png")

    @app.post(PREFIX + "/train")
    def train(body: dict = Body(...)) -> Any:  # noqa: B008
        return guarded(lambda: service.start_training(TrainRequest.from_dict(body)))

    @app.post(PREFIX + "/train/resume")
    def resume(body: dict = Body(default={})) -> Any:  # noqa: B008
        return guarded(
            lambda: service.start_training(
                training.saved_job(service.folder(), str(body.get("bank", "")), str(body.get("name", "")))
            )
        )

    @app.post(PREFIX + "/train/interrupt")
    def interrupt() -> Any:
        host.state().interrupt()
        return {"interrupted": True}

    @app.get(PREFIX + "/train/status")
    def status() -> Any:
        return training.STATUS.as_dict()
