"""Prepare real Automatic1111 v1.10.1 and Forge checkouts (with their venvs) for ``tests/a1111``.

Standard library only; run it with any Python 3:

    python tests/a1111/prepare.py a1111 /opt/a1111  --python python3.10
    python tests/a1111/prepare.py forge /opt/forge  --python python3.10

then ``A1111_PATH=/opt/a1111 FORGE_PATH=/opt/forge python -m pytest tests/a1111``.

What it does, for each host, at the commits the host itself pins (see ``PINS``):
1. ``git clone`` the web UI and its ``repositories/`` (skipped when already at the pinned commit);
2. create ``<checkout>/venv`` with the given Python 3.10 and install torch/torchvision at the host's pin,
   then the host's ``requirements_versions.txt`` (with torch held), then openai/CLIP with ``--no-deps``.
   Nothing else: the host never installs anything at start (the tests launch it with
   ``--skip-prepare-environment``), and this extension installs nothing into it.

Where the machine has no GitHub access, point the clones elsewhere: ``SEQLORA_GIT_URL`` is a template
with ``{owner}`` and ``{name}`` (default ``https://github.com/{owner}/{name}.git``; a local mirror works,
e.g. ``/mirrors/{owner}+{name}/repo``), and ``SEQLORA_GIT_URL_<OWNER>_<NAME>`` (upper case, ``-`` as
``_``) overrides one repository. ``PIP_*`` variables reach pip as usual. Every step is idempotent: a
finished venv is marked with ``venv/.seqlora-prepared`` and kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (folder under the checkout, owner, repository, commit)
PINS: dict[str, dict] = {
    "a1111": {
        "web": ("AUTOMATIC1111", "stable-diffusion-webui", "82a973c04367123ae98bd9abdf80d9eda9b910e2"),  # v1.10.1
        "repositories": [
            (
                "stable-diffusion-webui-assets",
                "AUTOMATIC1111",
                "stable-diffusion-webui-assets",
                "6f7db241d2f8ba7457bac5ca9753331f0c266917",
            ),
            (
                "stable-diffusion-stability-ai",
                "Stability-AI",
                "stablediffusion",
                "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf",
            ),
            ("generative-models", "Stability-AI", "generative-models", "45c443b316737a4ab6e40413d7794a7f5657c19f"),
            ("k-diffusion", "crowsonkb", "k-diffusion", "ab527a9a6d347f364e3d185ba6d714e22d80cb3c"),
            ("BLIP", "salesforce", "BLIP", "48211a1594f1321b00f14c9f7a5b4813144b2fb9"),
        ],
        "torch": ["torch==2.1.2", "torchvision==0.16.2"],
    },
    "forge": {
        "web": ("lllyasviel", "stable-diffusion-webui-forge", "dfdcbab685e57677014f05a3309b48cc87383167"),
        "repositories": [
            (
                "stable-diffusion-webui-assets",
                "AUTOMATIC1111",
                "stable-diffusion-webui-assets",
                "6f7db241d2f8ba7457bac5ca9753331f0c266917",
            ),
            ("huggingface_guess", "lllyasviel", "huggingface_guess", "84826248b49bb7ca754c73293299c4d4e23a548d"),
            ("BLIP", "salesforce", "BLIP", "48211a1594f1321b00f14c9f7a5b4813144b2fb9"),
        ],
        "torch": ["torch==2.3.1", "torchvision==0.18.1"],
    },
}
CLIP = ("openai", "CLIP", "d50d76daa670286dd6cacf3bcd80b5e4823fc8e1")
MARKER = ".seqlora-prepared"


def say(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    say(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)


def git_url(owner: str, name: str) -> str:
    key = f"SEQLORA_GIT_URL_{owner}_{name}".upper().replace("-", "_")
    if os.environ.get(key):
        return os.environ[key]
    template = os.environ.get("SEQLORA_GIT_URL") or "https://github.com/{owner}/{name}.git"
    return template.format(owner=owner, name=name)


def head(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return out.stdout.strip()


def clone(owner: str, name: str, commit: str, dest: Path) -> None:
    """A checkout of `commit` at `dest` (kept when it is already there)."""
    if head(dest) == commit:
        say(f"{dest} is at {commit[:10]}")
        return
    if dest.exists() and any(dest.iterdir()):
        if (dest / ".git").exists():
            run(["git", "-C", dest, "fetch", "--quiet", git_url(owner, name)])
            run(["git", "-C", dest, "checkout", "--quiet", "--force", commit])
            return
        raise SystemExit(f"{dest} exists and is not a git checkout; remove it or choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["git", "clone", "--quiet", "--no-checkout", git_url(owner, name), dest])
    run(["git", "-C", dest, "checkout", "--quiet", commit])


def pip(venv_python: Path, *args: str) -> None:
    run([venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args])


def prepare(host: str, root: Path, python: str) -> Path:
    pins = PINS[host]
    owner, name, commit = pins["web"]
    clone(owner, name, commit, root)
    for folder, r_owner, r_name, r_commit in pins["repositories"]:
        clone(r_owner, r_name, r_commit, root / "repositories" / folder)

    venv = root / "venv"
    vpy = venv / "bin" / "python"
    if (venv / MARKER).is_file():
        say(f"{venv} is prepared ({(venv / MARKER).read_text().strip()})")
        return vpy
    if not vpy.exists():
        run([python, "-m", "venv", venv])
    version = subprocess.run(
        [vpy, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if version != "3.10":
        raise SystemExit(f"{host} needs Python 3.10 (got {version} from {python}); pass --python python3.10")
    pip(vpy, *pins["torch"])
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins["torch"]) + "\n")
        pip(vpy, "-r", str(root / "requirements_versions.txt"), "-c", str(constraints))
        clip_src = Path(tmp) / "CLIP"
        clone(*CLIP, clip_src)
        shutil.rmtree(clip_src / ".git", ignore_errors=True)
        pip(vpy, "--no-deps", str(clip_src))
    (venv / MARKER).write_text(f"{host} {commit} {' '.join(pins['torch'])}\n")
    say(f"{host} ready: {root} (Python {vpy})")
    return vpy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("host", choices=sorted(PINS), help="which web UI")
    ap.add_argument("path", type=Path, help="checkout folder (created); pass it as A1111_PATH or FORGE_PATH")
    ap.add_argument("--python", default="python3.10", help="a Python 3.10 interpreter for the venv")
    args = ap.parse_args(argv)
    vpy = prepare(args.host, args.path.resolve(), args.python)
    var = "A1111_PATH" if args.host == "a1111" else "FORGE_PATH"
    print(f"export {var}={args.path.resolve()}  # its Python: {vpy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
