"""Run SeqLoRA inside a real Automatic1111 or Forge server, headless and offline.

The host checkout comes from ``A1111_PATH`` / ``FORGE_PATH`` (prepared by ``prepare.py``; its Python is
``<checkout>/venv/bin/python`` unless ``A1111_PYTHON`` / ``FORGE_PYTHON`` say otherwise). Nothing is written
into the checkout or the repository: every server gets ``--data-dir <temp>``, whose ``extensions/`` holds a
link to this repository (the extension) and to ``probe/`` (a test-only extension with routes that read the
patched weights), and whose ``models/`` holds the random checkpoint, built once and cached under
``SEQLORA_TEST_CACHE`` (default ``~/.cache/seqlora/tests``).

This folder is deliberately not a Python package (like ``tests/comfy``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOKENIZER = next(REPO_ROOT.glob("seqlora_core/**/tokenizer_assets"))  # the vendored CLIP tokenizer
TINY_VERSION = 2  # bump when the tiny recipe in build_checkpoint.py changes
CLIP_L = "openai/clip-vit-large-patch14"
CLIP_L_SNAPSHOT = "0000000000000000000000000000000000000000"
A1111_ENV = ("A1111_PATH", "A1111_PYTHON")
FORGE_ENV = ("FORGE_PATH", "FORGE_PYTHON")


@dataclass(frozen=True)
class Host:
    kind: str  # "a1111" | "forge"
    path: Path
    python: Path


def host_from_env(kind: str) -> tuple[Host | None, str]:
    """(host, "") or (None, why it is not usable)."""
    path_var, py_var = A1111_ENV if kind == "a1111" else FORGE_ENV
    value = os.environ.get(path_var, "").strip()
    if not value:
        return None, (
            f"{path_var} is not set: point it at a checkout prepared with "
            f"`python tests/a1111/prepare.py {kind} <folder>`"
        )
    path = Path(value).expanduser().resolve()
    if not (path / "launch.py").is_file() or not (path / "modules").is_dir():
        return None, f"{path_var}={path} is not a web UI checkout (no launch.py/modules)"
    py = Path(os.environ.get(py_var, "").strip() or path / "venv" / "bin" / "python")
    if not py.is_file():
        return None, f"{py_var}: no Python at {py}; prepare the checkout or set {py_var}"
    return Host(kind, path, py), ""


def cache_dir() -> Path:
    base = os.environ.get("SEQLORA_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqlora", "tests"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_checkpoint(a1111: Host, kind: str, seed: int = 0) -> Path:
    """The cached random checkpoint (tiny: with its .yaml and .clip folder), built with A1111's ldm."""
    name = f"tiny-ldm-v{TINY_VERSION}-seed{seed}" if kind == "tiny" else f"sd15-random-seed{seed}"
    out = cache_dir() / f"{name}.safetensors"
    if out.is_file() and (kind != "tiny" or out.with_suffix(".yaml").is_file()):
        return out
    cmd = [
        str(a1111.python),
        str(HERE / "build_checkpoint.py"),
        "--webui",
        str(a1111.path),
        "--kind",
        kind,
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--tokenizer",
        str(TOKENIZER),
    ]
    subprocess.run(cmd, check=True, cwd=a1111.path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return out


def write_hf_cache(hf_home: Path) -> Path:
    """An offline Hugging Face cache holding the CLIP-L text config and the project's vendored tokenizer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seqlora_build_checkpoint", HERE / "build_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    repo = hf_home / "hub" / ("models--" + CLIP_L.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(CLIP_L_SNAPSHOT)
    mod.write_clip_folder(repo / "snapshots" / CLIP_L_SNAPSHOT, mod.SD15_TEXT, TOKENIZER)
    return hf_home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebUI:
    """A running web UI (``launch.py``) on 127.0.0.1 with its own data folder."""

    host: Host
    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> Path:
        return self.data_dir / "models"

    @property
    def lora_dir(self) -> Path:
        return self.models / "Lora"

    @property
    def banks_dir(self) -> Path:
        return self.models / "seqlora"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""

    # ---- HTTP -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, code, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, code, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        if "json" in ctype:
            return code, json.loads(raw or b"null")
        return code, raw

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body if body is not None else {}, **kw)

    def ok(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        code, out = self.request(method, path, body, timeout)
        if code != 200:
            raise AssertionError(f"{method} {path} -> {code}: {out!r}\n--- log tail ---\n{self.log()[-4000:]}")
        return out

    # ---- gradio (UI mode): call an event handler the way the browser does --------------------------
    def config(self) -> dict[str, Any]:
        return self.ok("GET", "/config")

    def component_id(self, elem_id: str) -> int:
        for c in self.config()["components"]:
            if c.get("props", {}).get("elem_id") == elem_id:
                return c["id"]
        raise KeyError(f"no component with elem_id {elem_id!r}")

    def predict(self, trigger_elem_id: str, data: list[Any], timeout: float = 1200) -> list[Any]:
        """Run the handler bound to a click on `trigger_elem_id` with `data` in its input order."""
        cfg = self.config()
        target = self.component_id(trigger_elem_id)
        for i, dep in enumerate(cfg["dependencies"]):
            targets = [t[0] if isinstance(t, list) else t for t in dep.get("targets", [])]
            if target in targets and dep.get("backend_fn", True) and dep.get("trigger", "click") == "click":
                if len(dep["inputs"]) != len(data):
                    raise AssertionError(
                        f"{trigger_elem_id}: handler takes {len(dep['inputs'])} inputs, got {len(data)}"
                    )
                out = self.ok(
                    "POST",
                    "/run/predict",
                    {"fn_index": i, "data": data, "session_hash": "seqlora-test"},
                    timeout=timeout,
                )
                return out["data"]
        raise KeyError(f"no click handler on {trigger_elem_id!r}")

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self, checkpoint: Path, ui: bool, timeout: float = 900) -> WebUI:
        env = {
            **os.environ,
            "HF_HOME": str(self.data_dir / "hf"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONUNBUFFERED": "1",
            "DISABLE_TELEMETRY": "1",
            **self.extra_env,
        }
        for var in ("PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(var, None)
        args = [
            str(self.host.python),
            "launch.py",
            "--data-dir",
            str(self.data_dir),
            "--skip-prepare-environment",
            "--skip-torch-cuda-test",
            "--skip-version-check",
            "--api",
            "--server-name",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ckpt",
            str(checkpoint),
            "--no-download-sd-model",
            "--loglevel",
            "DEBUG",
        ]
        if self.host.kind == "a1111":
            args += [
                "--use-cpu",
                "all",
                "--no-half",
                "--precision",
                "full",
                "--do-not-download-clip",
                "--disable-nan-check",
            ]
        else:
            args += ["--always-cpu", "--disable-nan-check"]
        if not ui:
            args.append("--nowebui")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            args, cwd=self.host.path, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._logf = logf
        ready = "/sdapi/v1/sd-models"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the web UI exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.get(ready, timeout=10)[0] == 200 and (not ui or self.get("/config", timeout=30)[0] == 200):
                    self.started_s = time.monotonic() - t0
                    return self
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"the web UI did not answer within {timeout} s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        """Kill the server's process group (``server-stop`` does not end a ``--nowebui`` server)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if getattr(self, "_logf", None):
            self._logf.close()


def install_extension(dest: Path) -> Path:
    """The repository as an installed extension: a folder of links to its top-level entries.

    Not a link to the repository itself: the host reads the git remote of an extension that is a git
    checkout, and a development worktree may have none (a user's clone always has one).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name in (".git", ".venv") or entry.name.startswith(".venv") or entry.name == "__pycache__":
            continue
        link = dest / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


def prepare_data_dir(data_dir: Path, checkpoint: Path, with_probe: bool = True) -> Path:
    """A web UI data folder: the extension (a link to this repository), the probe, the checkpoint, an HF cache."""
    ext = data_dir / "extensions"
    ext.mkdir(parents=True, exist_ok=True)
    install_extension(ext / "seqlora")
    if with_probe and not (ext / "seqlora_test_probe").exists():
        (ext / "seqlora_test_probe").symlink_to(HERE / "probe", target_is_directory=True)
    sd = data_dir / "models" / "Stable-diffusion"
    sd.mkdir(parents=True, exist_ok=True)
    for src in [checkpoint, checkpoint.with_suffix(".yaml")]:
        if src.is_file() and not (sd / src.name).exists():
            (sd / src.name).symlink_to(src)
    (data_dir / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    write_hf_cache(data_dir / "hf")
    return data_dir


@contextlib.contextmanager
def running(host: Host, data_dir: Path, checkpoint: Path, ui: bool, log_name: str) -> Iterator[WebUI]:
    server = WebUI(host, data_dir, free_port(), data_dir / "logs" / log_name)
    try:
        yield server.start(data_dir / "models" / "Stable-diffusion" / checkpoint.name, ui=ui)
    finally:
        server.stop()


def snapshot(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under `roots` (links are not followed)."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            dirnames[:] = [
                d
                for d in dirnames
                if d != "__pycache__"
                and not os.path.islink(os.path.join(dirpath, d))
                and not any(os.path.normpath(os.path.join(rel_dir, d)).startswith(s) for s in skip)
            ]
            for f in filenames:
                p = os.path.join(dirpath, f)
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    out[p] = (st.st_size, st.st_mtime_ns)
    return out


def copy_images(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
