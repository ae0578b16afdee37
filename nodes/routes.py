"""HTTP routes for the SeqLoRA frontend: ``GET /seqlora/bank_info?file=...`` and ``GET /seqlora/banks``."""

from __future__ import annotations

from aiohttp import web

from ..seqlora_core.method.bank import header_summary, read_bank_header
from . import bankfiles

MAX_NAME = 1024  # characters of a ?file= value


async def bank_info(request: web.Request) -> web.Response:
    """The bank's concepts (name, triggers, rank, method, steps), read from its header only.

    ``file`` must be one of the listed bank files (no paths); errors name the file, never a folder of
    this machine."""
    name = request.query.get("file", "")
    if not name:
        return web.json_response({"error": "missing ?file=<bank file in models/seqlora>"}, status=400)
    if len(name) > MAX_NAME or any(ord(ch) < 32 for ch in name):
        return web.json_response({"error": "file: not a bank file name"}, status=400)
    if name not in bankfiles.list_banks():
        return web.json_response(
            {"error": "file: no such bank in models/seqlora; give a file name as the bank list shows it"}, status=404
        )
    try:
        path = bankfiles.bank_path(name)
    except FileNotFoundError as e:
        return web.json_response({"error": str(e)}, status=404)
    try:
        info = header_summary(read_bank_header(path))
    except FileNotFoundError:
        return web.json_response({"error": f"bank file {name!r} not found in models/seqlora"}, status=404)
    except (OSError, ValueError) as e:
        return web.json_response({"error": bankfiles.public_message(str(e), path, name)}, status=422)
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
