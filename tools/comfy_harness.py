"""Running SeqLoRA against a real ComfyUI checkout: shared by the tests in ``tests/comfy``, the benchmark
``bench/comfy_trainer_ratio.py`` and ``tools/build_workflows.py``.

Two tiers share this module:

* in-process: ComfyUI's packages are imported into the test interpreter (`setup_inprocess`) and our
  pack is loaded the way ComfyUI loads custom nodes (`load_pack`);
* server: `ComfyServer` starts ``main.py --cpu`` with an extra-model-paths file that maps
  ``custom_nodes`` to a temporary folder holding a link to this repository, posts API prompts,
  polls ``/history`` and records websocket events (`EventRecorder`).

The ComfyUI checkout comes from the ``COMFYUI_PATH`` environment variable; without it (or without
torch and torchvision in the running interpreter) every ComfyUI test is skipped with `SKIP_REASON`.
Nothing here writes into the ComfyUI checkout or the repository: models, outputs and the tiny
checkpoint live in temporary folders.

Callers put ``tools/`` on ``sys.path`` and ``import comfy_harness`` (``tests/comfy`` is deliberately not
a Python package: pytest would import it as a top-level package named ``comfy`` and shadow ComfyUI's own).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout whose Python has torch+torchvision; see README"
REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "seqlora"
PACK_MODULE = "seqlora_pack"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


# --------------------------------------------------------------------------- locating ComfyUI


def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when unset or not a checkout."""
    value = os.environ.get("COMFYUI_PATH", "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        return None
    return path


def missing_requirements() -> str | None:
    """Why this interpreter cannot run ComfyUI, or None when it can."""
    path = comfyui_path()
    if path is None:
        if os.environ.get("COMFYUI_PATH"):
            return f"COMFYUI_PATH does not point at a ComfyUI checkout (no main.py/comfy): {SKIP_REASON}"
        return SKIP_REASON
    for mod in ("torch", "torchvision", "aiohttp", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed in this Python: {SKIP_REASON}"
    return None


def require_comfyui() -> Path:
    """Return the ComfyUI checkout or skip the calling test with a clear reason."""
    why = missing_requirements()
    if why is not None:
        import pytest

        pytest.skip(why)
    path = comfyui_path()
    assert path is not None
    return path


def test_threads() -> int:
    """CPU threads for torch in tests (``SEQLORA_TEST_THREADS``, default 1).

    Tiny models run many small parallel regions; on a shared 2-core machine an OpenMP team waiting for a
    descheduled thread makes them 10-80x slower, so one thread is the robust default.
    """
    try:
        return max(1, int(os.environ.get("SEQLORA_TEST_THREADS", "1")))
    except ValueError:
        return 1


# --------------------------------------------------------------------------- in-process tier

_INPROCESS: dict[str, Any] = {}


def setup_inprocess(models_root: Path | None = None, cpu: bool = True) -> Path:
    """Import ComfyUI into this interpreter (on CPU unless `cpu` is False), with model folders under
    `models_root`.

    Idempotent. ``args.cpu`` is set before ``comfy.model_management`` is imported, because with a
    CUDA build of torch that import otherwise looks for a GPU.
    """
    path = require_comfyui()
    if _INPROCESS.get("path") == path:
        if models_root is not None:
            _register_model_folders(models_root)
        return path
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    _assert_module_origin("comfy", path)
    from comfy.cli_args import args

    args.cpu = cpu
    import torch

    if cpu:
        torch.set_num_threads(test_threads())
    args.disable_metadata = False
    import comfy.model_management  # noqa: F401  (must come after args.cpu)
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401

    _assert_module_origin("nodes", path)
    _INPROCESS["path"] = path
    if models_root is not None:
        _register_model_folders(models_root)
    return path


def _assert_module_origin(name: str, comfy_root: Path) -> None:
    """Fail loudly when a module of that name was already imported from somewhere else."""
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.find_spec(name)
        origin = (spec.origin or next(iter(spec.submodule_search_locations or []), None)) if spec else None
    else:
        origin = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [])), None)
    if origin is None or not Path(origin).resolve().is_relative_to(comfy_root):
        raise RuntimeError(f"module {name!r} resolves to {origin}, not to ComfyUI at {comfy_root}")


def _register_model_folders(models_root: Path) -> None:
    """Point checkpoints/loras/seqlora and the output/temp/input folders at `models_root`."""
    import folder_paths

    models_root.mkdir(parents=True, exist_ok=True)
    for kind in ("checkpoints", "loras", "seqlora"):
        folder = models_root / kind
        folder.mkdir(exist_ok=True)
        exts = folder_paths.supported_pt_extensions
        if kind in folder_paths.folder_names_and_paths:
            paths, exts = folder_paths.folder_names_and_paths[kind]
            folder_paths.folder_names_and_paths[kind] = ([str(folder)] + [p for p in paths if p != str(folder)], exts)
        else:
            folder_paths.folder_names_and_paths[kind] = ([str(folder)], exts)
    for sub, setter in (
        ("output", folder_paths.set_output_directory),
        ("temp", folder_paths.set_temp_directory),
        ("input", folder_paths.set_input_directory),
    ):
        (models_root / sub).mkdir(exist_ok=True)
        setter(str(models_root / sub))
    folder_paths.filename_list_cache.clear()


def load_pack(name: str = PACK_MODULE):
    """Import this repository as a custom-node package, the way ComfyUI's loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --------------------------------------------------------------------------- tiny checkpoint


def _fill_(named: Iterable[tuple[str, Any]], generator) -> None:
    """Give every tensor a finite value: norm scales 1, biases/shifts 0, matrices N(0, (0.5/sqrt(fan_in))^2)."""
    import torch

    with torch.no_grad():
        for name, t in named:
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or "shift" in leaf:
                t.zero_()
            elif t.ndim <= 1:
                t.fill_(1.0)
            else:
                fan_in = int(t[0].numel())
                t.copy_(torch.randn(t.shape, generator=generator) * (0.5 / fan_in**0.5))


# ComfyUI's model detection (comfy/model_detection.py, comfy/supported_models.py) pins only a few numbers per
# family; the rest of each UNet is as small as it can be while ComfyUI still detects the family.
TINY_UNETS: dict[str, dict[str, Any]] = {
    # SD15: width 320, context 768, conv proj_in, no ADM; one level, one res block, one transformer
    "sd15": dict(
        num_res_blocks=1,
        channel_mult=(1,),
        num_heads=8,
        transformer_depth=[1],
        transformer_depth_output=[1, 1],
        transformer_depth_middle=-2,
        context_dim=768,
        use_linear_in_transformer=False,
    ),
    # SD20: width 320, context 1024, linear proj_in, no ADM; v-prediction is read from the spread of
    # output_blocks.11's first norm1.bias, so the block layout is SD2's own (4 levels, 2 res blocks)
    "sd2v": dict(
        num_res_blocks=2,
        channel_mult=(1, 1, 1, 1),
        num_head_channels=64,
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # shallow level first, as detected
        transformer_depth_middle=1,
        context_dim=1024,
        use_linear_in_transformer=True,
    ),
    # the real SD1.5 UNet (859 M parameters): for timings that mean something on a GPU
    "sd15_full": dict(
        num_res_blocks=2,
        channel_mult=(1, 2, 4, 4),
        num_heads=8,
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
    ),
    # SDXL: width 320, context 2048, ADM 2816, linear proj_in and transformer depths [0, 0, 2, 2, 10, 10]
    # per input res block (one level of six res blocks here); output depths are free
    "sdxl": dict(
        num_res_blocks=6,
        channel_mult=(1,),
        num_head_channels=64,
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 0, 1, 1, 1],
        transformer_depth_middle=-2,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_classes="sequential",
    ),
}
V_PRED_MARK = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # SD20.model_type reads its spread


def _text_encoder(config_file: Path, generator, keep_projection: bool) -> dict[str, Any]:
    """A randomly filled ComfyUI CLIPTextModel of a fixed config: its state dict (text_model.*, and
    text_projection.weight when `keep_projection`)."""
    import json as _json

    import comfy.clip_model
    import comfy.ops
    import torch

    config = _json.loads(config_file.read_text())
    model = comfy.clip_model.CLIPTextModel(
        config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init
    )
    _fill_(list(model.named_parameters()) + list(model.named_buffers()), generator)
    keep = ("text_model.", "text_projection.") if keep_projection else ("text_model.",)
    out = {k: v.to(torch.float16) for k, v in model.state_dict().items() if k.startswith(keep)}
    del model
    return out


def build_tiny_checkpoint(path: Path, seed: int = 0, family: str = "sd15") -> Path:
    """Write a random checkpoint that ComfyUI detects as `family` (sd15, sd2v or sdxl), fp16, with TAESD
    as the VAE and the family's full-size text encoders (ComfyUI builds them from fixed configs):

    - sd15: a 1-level UNet and CLIP-L (~276 MiB); sd15_full: the real SD1.5 UNet and CLIP-L (~1.9 GiB);
    - sd2v: SD2's 4-level block layout at width 320 and OpenCLIP-H, detected as v-prediction (~0.9 GiB);
    - sdxl: a 1-level UNet with SDXL's transformer depths and ADM input, CLIP-L and OpenCLIP-bigG (~1.8 GiB).

    Deterministic for a given `seed`. Needs `setup_inprocess` first.
    """
    import comfy.clip_model
    import comfy.ops
    import comfy.taesd.taesd
    import safetensors.torch
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if family not in TINY_UNETS:
        raise ValueError(f"family: {family!r}; use one of {sorted(TINY_UNETS)}")
    path = Path(path)
    if path.is_file():
        return path
    gen = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    out: dict[str, torch.Tensor] = {}

    unet = UNetModel(
        image_size=32,
        in_channels=4,
        model_channels=320,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        operations=ops,
        **TINY_UNETS[family],
    )
    _fill_(list(unet.named_parameters()) + list(unet.named_buffers()), gen)
    if family == "sd2v":
        mark = unet.get_parameter(V_PRED_MARK)
        with torch.no_grad():
            mark.copy_(0.2 * torch.randn(mark.shape, generator=gen))
    out.update({f"model.diffusion_model.{k}": v.to(torch.float16) for k, v in unet.state_dict().items()})
    del unet

    vae = comfy.taesd.taesd.TAESD()
    _fill_(list(vae.named_parameters()) + list(vae.named_buffers()), gen)
    out.update({f"first_stage_model.{k}": v.to(torch.float16) for k, v in vae.state_dict().items()})
    del vae

    configs = Path(comfy.clip_model.__file__).parent
    if family in ("sd15", "sd15_full"):
        clip_l = _text_encoder(configs / "sd1_clip_config.json", gen, keep_projection=False)
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l.items()})
    elif family == "sd2v":
        clip_h = _text_encoder(configs / "text_encoders" / "sd2_clip_config.json", gen, keep_projection=True)
        out.update({f"cond_stage_model.model.transformer.{k}": v for k, v in clip_h.items()})
    else:
        clip_l = _text_encoder(configs / "sd1_clip_config.json", gen, keep_projection=False)
        out.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()})
        del clip_l
        clip_g = _text_encoder(configs / "clip_config_bigg.json", gen, keep_projection=True)
        out.update({f"conditioner.embedders.1.model.transformer.{k}": v for k, v in clip_g.items()})
    out = {k: v.contiguous() for k, v in out.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    safetensors.torch.save_file(out, str(tmp))
    os.replace(tmp, path)
    return path


def cache_dir() -> Path:
    """Where test checkpoints are cached between runs: ``$SEQLORA_TEST_CACHE``, else
    ``~/.cache/seqlora/tests`` (``$XDG_CACHE_HOME`` respected)."""
    base = os.environ.get("SEQLORA_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqlora", "tests"
    )
    return Path(base)


def make_images(
    folder: Path,
    count: int,
    size: int = 64,
    seed: int = 0,
    color: tuple[int, int, int] | None = None,
    caption: str | None = None,
) -> Path:
    """Write `count` small PNGs (a coloured square on noise) plus optional .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.array(color if color is not None else rng.integers(0, 256, 3), dtype=np.float32)
    for i in range(count):
        img = rng.normal(128, 30, (size, size, 3))
        lo, hi = size // 4, 3 * size // 4
        shift = int(rng.integers(-size // 8, size // 8 + 1))
        img[lo + shift : hi + shift, lo:hi] = base
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
        if caption is not None:
            (folder / f"img_{i:02d}.txt").write_text(caption)
    return folder


# --------------------------------------------------------------------------- server tier


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServerError(RuntimeError):
    """The server did not start, or a prompt failed in a way the caller did not expect."""


class ComfyServer:
    """A headless ComfyUI (``main.py --cpu``) with this repository installed as a custom node pack.

    Layout under `root`: ``custom_nodes/seqlora`` (a link to the repository), ``models/{checkpoints,
    loras,seqlora}``, ``input``, ``output``, ``temp``, ``user`` and ``extra_model_paths.yaml``.
    """

    def __init__(
        self,
        root: Path,
        comfy_path: Path | None = None,
        python: str | None = None,
        port: int | None = None,
        extra_args: Iterable[str] = (),
        pack_dir: Path = REPO_ROOT,
    ) -> None:
        self.root = Path(root)
        self.comfy_path = comfy_path or require_comfyui()
        self.python = python or sys.executable
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.pack_dir = Path(pack_dir)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "comfyui.log"
        self.models = self.root / "models"
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> Path:
        """Create the folders, the pack link and the extra-model-paths file; return the yaml path."""
        nodes_dir = self.root / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        link = nodes_dir / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        for sub in ("checkpoints", "loras", "seqlora"):
            (self.models / sub).mkdir(parents=True, exist_ok=True)
        for d in (self.input_dir, self.output_dir, self.temp_dir, self.root / "user"):
            d.mkdir(parents=True, exist_ok=True)
        yaml = self.root / "extra_model_paths.yaml"
        yaml.write_text(
            "seqlora_test:\n"
            f"  base_path: {self.root}\n"
            "  is_default: true\n"
            "  custom_nodes: custom_nodes\n"
            "  checkpoints: models/checkpoints\n"
            "  loras: models/loras\n"
            "  seqlora: models/seqlora\n"
        )
        return yaml

    def start(self, timeout: float = 180.0) -> ComfyServer:
        """Start the server and wait until ``/system_stats`` answers."""
        yaml = self.prepare()
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--extra-model-paths-config",
            str(yaml),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_dir),
            "--input-directory",
            str(self.input_dir),
            "--user-directory",
            str(self.root / "user"),
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(test_threads()))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server by its PID (terminate, then kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- HTTP
    def get(self, route: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def get_bytes(self, route: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return r.read()

    def post(self, route: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
        """POST JSON; returns (status, decoded body), also for 4xx answers."""
        req = urllib.request.Request(
            self.url + route,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info", timeout=120)

    def submit(
        self, prompt: Mapping[str, Any], client_id: str | None = None, workflow: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST /prompt; returns the answer (``prompt_id``) or raises with the node errors."""
        payload: dict[str, Any] = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, body = self.post("/prompt", payload)
        if status != 200:
            raise ComfyServerError(f"/prompt refused ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt succeeded, failed or was interrupted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI died:\n{self.log_tail()}")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") in ("success", "error") or status.get("completed"):
                    return entry
            time.sleep(poll)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(
        self,
        prompt: Mapping[str, Any],
        timeout: float = 600.0,
        client_id: str | None = None,
        workflow: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit and wait; returns the history entry (check ``status.status_str``)."""
        pid = self.submit(prompt, client_id=client_id, workflow=workflow)["prompt_id"]
        return self.wait(pid, timeout=timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free_memory(self) -> None:
        """Unload models and drop ComfyUI's node output cache."""
        self.post("/free", {"unload_models": True, "free_memory": True})


def history_messages(entry: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(event, data) pairs recorded in a history entry's status."""
    return [(m[0], m[1]) for m in entry.get("status", {}).get("messages", [])]


def history_error(entry: Mapping[str, Any]) -> dict | None:
    """The ``execution_error`` payload of a history entry, if any."""
    for name, data in history_messages(entry):
        if name == "execution_error":
            return data
    return None


# --------------------------------------------------------------------------- API prompts

SAMPLER_OUTPUT = "105"  # the id of the image output node of `sampler_graph`


def sampler_graph(
    checkpoint: str,
    model: list | None = None,
    *,
    prompt: str = "a photo",
    seed: int = 0,
    steps: int = 1,
    cfg: float = 1.0,
    size: int = 64,
    output: str = "SaveImage",
    prefix: str = "seqlora",
) -> dict[str, dict[str, Any]]:
    """An API prompt that loads `checkpoint` (node "1") and samples one image from `model` (a link such as
    ``["2", 0]``; the checkpoint's own model by default) with the prompt as both conditionings, decodes it
    and hands it to `output` (``SaveImage`` with `prefix`, or ``PreviewImage``) as node `SAMPLER_OUTPUT`.
    Nodes "101" to "105" are the sampling chain; callers add the nodes that `model` comes from."""
    images: dict[str, Any] = {"images": ["104", 0]}
    if output == "SaveImage":
        images["filename_prefix"] = prefix
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "101": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "102": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "103": {
            "class_type": "KSampler",
            "inputs": {
                "model": model or ["1", 0],
                "positive": ["101", 0],
                "negative": ["101", 0],
                "latent_image": ["102", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "104": {"class_type": "VAEDecode", "inputs": {"samples": ["103", 0], "vae": ["1", 2]}},
        SAMPLER_OUTPUT: {"class_type": output, "inputs": images},
    }


class EventRecorder:
    """Records every JSON websocket event for one client id in a background thread."""

    def __init__(self, server: ComfyServer, client_id: str | None = None) -> None:
        import websocket  # websocket-client

        self.client_id = client_id or uuid.uuid4().hex
        self.events: list[tuple[str, dict]] = []
        self._lock = threading.Condition()
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=5)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import websocket

        while not self._stop:
            try:
                msg = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # closed
                return
            if isinstance(msg, bytes):
                continue  # binary previews
            try:
                data = json.loads(msg)
            except ValueError:
                continue
            with self._lock:
                self.events.append((data.get("type", ""), data.get("data", {})))
                self._lock.notify_all()

    def of(self, event: str) -> list[dict]:
        with self._lock:
            return [d for e, d in self.events if e == event]

    def wait_for(self, pred: Callable[[str, dict], bool], timeout: float = 300.0) -> tuple[str, dict]:
        """Block until an event satisfying `pred` was recorded; return it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            seen = 0
            while True:
                for e, d in self.events[seen:]:
                    if pred(e, d):
                        return e, d
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching event within {timeout:.0f} s; saw {[e for e, _ in self.events]}")
                self._lock.wait(min(left, 1.0))

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(Exception):
            self._ws.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- UI -> API conversion

_SEED_NAMES = ("seed", "noise_seed")


def _widget_inputs(spec: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """The inputs of an /object_info entry that are widgets, in order: (name, type, options)."""
    out = []
    order = spec.get("input_order") or {}
    inputs = spec.get("input", {})
    for section in ("required", "optional"):
        sec = inputs.get(section, {}) or {}
        names = order.get(section) or list(sec.keys())
        for name in names:
            typ, opts = (sec[name] + [{}])[:2] if isinstance(sec[name], list) else (sec[name], {})
            opts = opts or {}
            if opts.get("forceInput"):
                continue
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, typ, opts))
    return out


def _has_control_after_generate(name: str, typ: Any, opts: Mapping[str, Any]) -> bool:
    if typ != "INT":
        return False
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return name in _SEED_NAMES


def ui_to_api(
    workflow: Mapping[str, Any], object_info: Mapping[str, Any], randomize: Callable[[], int] | None = None
) -> dict[str, Any]:
    """Convert a UI-format workflow into the API format that ``POST /prompt`` runs.

    Widget values are positional in the UI format, in the order of the node's widget inputs in
    ``/object_info`` (``input_order``); INT seeds carry an extra ``control_after_generate`` value that
    is skipped, or applied when it says ``randomize`` and `randomize` is given. Inputs turned into
    sockets keep their slot in ``widgets_values``. Muted (mode 2) and bypassed (mode 4) nodes are
    left out; a bypassed node's consumers are rewired to the matching input. Reroute and note nodes
    are resolved or dropped.
    """
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(lk[0]): lk for lk in workflow.get("links", [])}

    def source(link_id: int, seen: set[int] | None = None) -> list | None:
        lk = links.get(int(link_id))
        if lk is None:
            return None
        _, src_id, src_slot, _, _, typ = lk[:6]
        src = nodes.get(int(src_id))
        if src is None:
            return None
        seen = seen or set()
        if int(src_id) in seen:
            raise ValueError(f"link cycle through node {src_id}")
        seen.add(int(src_id))
        if src["type"] == "Reroute":
            inp = (src.get("inputs") or [{}])[0]
            return source(inp["link"], seen) if inp.get("link") is not None else None
        if src.get("mode") == 4:  # bypass: pass through the first input of the same type
            for inp in src.get("inputs", []):
                if inp.get("type") == typ and inp.get("link") is not None:
                    return source(inp["link"], seen)
            return None
        if src.get("mode") == 2:
            return None
        return [str(src_id), int(src_slot)]

    prompt: dict[str, Any] = {}
    for nid, node in sorted(nodes.items()):
        ntype = node["type"]
        if ntype in ("Reroute", "Note", "MarkdownNote", "PrimitiveNode") or node.get("mode") in (2, 4):
            continue
        if ntype not in object_info:
            raise KeyError(f"node {nid}: type {ntype!r} is not known to this server")
        spec = object_info[ntype]
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {nid} ({ntype}): dict widgets_values are not supported")
        inputs: dict[str, Any] = {}
        pos = 0
        for name, typ, opts in _widget_inputs(spec):
            if pos >= len(values):
                break
            value = values[pos]
            pos += 1
            if _has_control_after_generate(name, typ, opts):
                control = values[pos] if pos < len(values) and isinstance(values[pos], str) else None
                if control is not None:
                    pos += 1
                    if control == "randomize" and randomize is not None:
                        value = randomize()
            elif opts.get("image_upload") and pos < len(values) and values[pos] == "image":
                pos += 1  # the upload button's placeholder value
            inputs[name] = value
        for inp in node.get("inputs", []) or []:
            link = inp.get("link")
            if link is None:
                continue
            src = source(link)
            if src is not None:
                inputs[inp["name"]] = src
            else:
                inputs.pop(inp["name"], None)
        entry: dict[str, Any] = {"class_type": ntype, "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or spec.get("display_name", ntype)}
        prompt[str(nid)] = entry

    # PrimitiveNode: its value feeds the widget-inputs of its targets
    for node in nodes.values():
        if node["type"] != "PrimitiveNode":
            continue
        value = (node.get("widgets_values") or [None])[0]
        for out in node.get("outputs", []) or []:
            for link_id in out.get("links") or []:
                lk = links.get(int(link_id))
                if lk is None:
                    continue
                target = prompt.get(str(lk[3]))
                if target is None:
                    continue
                name = nodes[int(lk[3])]["inputs"][lk[4]]["name"]
                target["inputs"][name] = value
    return prompt


def validate_ui_workflow(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[str]:
    """Static checks of a UI workflow against /object_info: known types, link types, widget counts."""
    problems: list[str] = []
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in ("Reroute", "Note", "MarkdownNote", "PrimitiveNode"):
            continue
        spec = object_info.get(ntype)
        if spec is None:
            problems.append(f"node {node['id']}: unknown type {ntype}")
            continue
        widgets = _widget_inputs(spec)
        expected = sum(1 + _has_control_after_generate(n, t, o) + bool(o.get("image_upload")) for n, t, o in widgets)
        values = list(node.get("widgets_values") or [])
        if len(values) != expected:
            problems.append(f"node {node['id']} ({ntype}): {len(values)} widget values, expected {expected}")
        else:
            pos = 0
            for name, typ, opts in widgets:
                value = values[pos]
                pos += 1 + _has_control_after_generate(name, typ, opts) + bool(opts.get("image_upload"))
                linked = any(i.get("name") == name and i.get("link") is not None for i in node.get("inputs") or [])
                if linked:
                    continue
                if isinstance(typ, list) and value not in typ:
                    problems.append(f"node {node['id']} ({ntype}): {name}={value!r} is not one of {typ[:8]}")
                elif typ in ("INT", "FLOAT") and not isinstance(value, bool) and isinstance(value, (int, float)):
                    lo, hi = opts.get("min"), opts.get("max")
                    if (lo is not None and value < lo) or (hi is not None and value > hi):
                        problems.append(f"node {node['id']} ({ntype}): {name}={value} outside [{lo}, {hi}]")
                elif typ in ("INT", "FLOAT") and not isinstance(value, (int, float)):
                    problems.append(f"node {node['id']} ({ntype}): {name}={value!r} is not a number")
        all_inputs = {**(spec["input"].get("required") or {}), **(spec["input"].get("optional") or {})}
        for inp in node.get("inputs", []) or []:
            if inp["name"] not in all_inputs:
                problems.append(f"node {node['id']} ({ntype}): no input named {inp['name']}")
    for lk in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, typ = lk[:6]
        s, d = nodes.get(int(src)), nodes.get(int(dst))
        if s is None or d is None:
            problems.append(f"link {link_id}: missing node")
            continue
        if s["type"] in object_info:
            outs = object_info[s["type"]]["output"]
            if src_slot >= len(outs):
                problems.append(f"link {link_id}: {s['type']} has no output {src_slot}")
            elif outs[src_slot] != typ and typ != "*":
                problems.append(f"link {link_id}: {s['type']} output {src_slot} is {outs[src_slot]}, link says {typ}")
        d_inputs = d.get("inputs") or []
        if dst_slot >= len(d_inputs) or d_inputs[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: target slot {dst_slot} of node {dst} does not reference it")
        elif d["type"] in object_info:
            spec = object_info[d["type"]]["input"]
            name = d_inputs[dst_slot]["name"]
            want = ({**(spec.get("required") or {}), **(spec.get("optional") or {})}.get(name) or [None])[0]
            if isinstance(want, list):
                want = "COMBO"
            if want is not None and want != typ and "*" not in (want, typ):
                problems.append(f"link {link_id}: {d['type']}.{name} wants {want}, link carries {typ}")
    return problems


def load_workflow(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def set_widget(workflow: dict[str, Any], node_id: int, index: int, value: Any) -> dict[str, Any]:
    """A copy of `workflow` with one positional widget value changed."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if int(node["id"]) == node_id:
            node["widgets_values"][index] = value
            return wf
    raise KeyError(node_id)


def random_seed() -> int:
    return random.randint(0, 2**32 - 1)


class UIGraph:
    """Builds UI-format workflows (what the editor saves) from /object_info node definitions."""

    def __init__(self, object_info: Mapping[str, Any]) -> None:
        self.info = object_info
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []
        self.groups: list[dict[str, Any]] = []

    def node(
        self,
        ntype: str,
        widgets: Iterable[Any] = (),
        pos: tuple[float, float] = (0, 0),
        title: str | None = None,
        size: tuple[float, float] = (320, 160),
        **properties: Any,
    ) -> int:
        """Add a node with positional widget values; returns its id."""
        spec = self.info[ntype]
        nid = len(self.nodes) + 1
        req = spec["input"].get("required") or {}
        opt = spec["input"].get("optional") or {}
        order = spec.get("input_order") or {"required": list(req), "optional": list(opt)}
        inputs = []
        for section, sec in (("required", req), ("optional", opt)):
            for name in order.get(section, list(sec)):
                typ, opts = (list(sec[name]) + [{}])[:2]
                opts = opts or {}
                is_widget = isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if is_widget and not opts.get("forceInput"):
                    continue
                inputs.append({"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": None})
        names = spec.get("output_name", spec["output"])
        outputs = [
            {"name": n, "type": t, "links": [], "slot_index": i}
            for i, (n, t) in enumerate(zip(names, spec["output"], strict=True))
        ]
        node: dict[str, Any] = {
            "id": nid,
            "type": ntype,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": nid - 1,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": ntype, **properties},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def link(self, src: int, out: int | str, dst: int, inp: str) -> int:
        """Connect output `out` (index or name) of `src` to input `inp` of `dst`."""
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        if isinstance(out, str):
            out = next(i for i, o in enumerate(s["outputs"]) if o["name"] == out)
        slot = next((i for i, x in enumerate(d["inputs"]) if x["name"] == inp), None)
        if slot is None:  # a widget converted to a socket
            d["inputs"].append({"name": inp, "type": s["outputs"][out]["type"], "link": None, "widget": {"name": inp}})
            slot = len(d["inputs"]) - 1
        link_id = len(self.links) + 1
        typ = s["outputs"][out]["type"]
        self.links.append([link_id, src, out, dst, slot, typ])
        s["outputs"][out]["links"].append(link_id)
        d["inputs"][slot]["link"] = link_id
        return link_id

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict[str, Any]:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


# --------------------------------------------------------------------------- headless Chromium


def chromium() -> str | None:
    """The headless Chromium (or Chrome) executable on PATH, or None."""
    import shutil

    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr[:80]}...: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_js(self, expr: str, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expr)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(expr)

    def problems(self) -> list[str]:
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(e["params"]["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])[:500])
        return out

    def screenshot(self) -> bytes:
        import base64

        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


@contextlib.contextmanager
def comfy_page(server: ComfyServer, profile: Path, size: tuple[int, int] = (1600, 1000)):
    """Headless Chromium on ComfyUI's web app with SeqLoRA's nodes registered: yields a `CDP` page whose
    graph is empty, at offset 0 and scale 1. The browser is stopped by its PID afterwards."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no headless Chromium installed (apt-get install chromium)")
    port = free_port()
    proc = subprocess.Popen(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pages = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if not pages:
            raise RuntimeError("Chromium did not open a page")
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        cdp.call("Runtime.enable")
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=server.url)
        cdp.wait_js(
            "!!(window.app && window.app.graph && window.LiteGraph && "
            "LiteGraph.registered_node_types['SeqLoRATrainConcept'])",
            timeout=180,
        )
        time.sleep(1.0)
        for _ in range(3):  # close the first-run template browser, start from an empty graph
            cdp.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
            cdp.call("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27)
        cdp.js(
            "document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()); app.graph.clear(); "
            "app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; true"
        )
        yield cdp
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# layout of a workflow in the real editor: every node's box as the frontend sizes it
NODE_BOXES_JS = """(async (wf) => {
    await app.loadGraphData(wf);
    const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
    return app.graph._nodes.map((n) => {
        const need = n.computeSize ? n.computeSize() : n.size;
        return {id: n.id, type: n.type, x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title,
                body_h: n.size[1], need_w: need[0], need_h: need[1]};
    });
})"""


def node_boxes(cdp: CDP, workflow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every node of `workflow` as the editor lays it out: its box (title bar included: x, y, w, h), its
    body's height and the size its widgets need (``computeSize``: need_w, need_h)."""
    return cdp.js(f"{NODE_BOXES_JS}({json.dumps(workflow)})")


def overlaps(boxes: list[Mapping[str, Any]], margin: float = 0.0) -> list[tuple[int, int]]:
    """Pairs of node ids whose boxes intersect (after growing each by `margin`)."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if (
                a["x"] - margin < b["x"] + b["w"]
                and b["x"] - margin < a["x"] + a["w"]
                and a["y"] - margin < b["y"] + b["h"]
                and b["y"] - margin < a["y"] + a["h"]
            ):
                out.append((a["id"], b["id"]))
    return out
