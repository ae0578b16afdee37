"""HTTP routes for the SeqLoRA frontend: ``GET /seqlora/bank_info?file=...`` and ``GET /seqlora/banks``."""

from __future__ import annotations

from aiohttp import web

from ..seqlora_core.method.bank import read_bank_header
from . import bankfiles


async def bank_info(request: web.Request) -> web.Response:
    """The bank's concepts (name, triggers, rank, method, steps), read from its header only."""
    name = request.query.get("file", "")
    if not name:
        return web.json_response({"error": "missing ?file=<bank file in models/seqlora>"}, status=400)
    try:
        path = bankfiles.bank_path(name)
        info = bankfiles.bank_summary(read_bank_header(path))
    except FileNotFoundError as e:
        return web.json_response({"error": str(e)}, status=404)
    except (OSError, ValueError) as e:
        return web.json_response({"error": str(e)}, status=422)
    return web.json_response({"file": name, **info})


async def banks(_request: web.Request) -> web.Response:
    return web.json_response({"files": bankfiles.list_banks()})


def register(server) -> bool:
    """Add the routes to ComfyUI's PromptServer (before it starts); False when there is no server."""
    if server is None:
        return False
    server.routes.get("/seqlora/bank_info")(bank_info)
    server.routes.get("/seqlora/banks")(banks)
    return True
