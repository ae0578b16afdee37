"""Keep ``example_workflows/`` (the folder ComfyUI's template browser reads) a copy of ``workflows/``.

``workflows/`` is the source: the tests, the docs and ``tools/build_workflows.py`` use it; each workflow
``<name>.json`` has its template-browser thumbnail ``<name>.jpg`` beside it
(``tools/workflow_thumbnails.py``). Run this after editing a workflow; ``--check`` only reports (exit
status 1 when the copy differs), as the tests do.

    python tools/sync_example_workflows.py [--check]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "workflows"
COPY = ROOT / "example_workflows"


KINDS = ("*.json", "*.jpg")  # workflows and their thumbnails


def _files(folder: Path) -> list[Path]:
    return sorted(p for kind in KINDS for p in folder.glob(kind))


def differences(source: Path = SOURCE, copy: Path = COPY) -> list[str]:
    """What differs between the two folders' workflow files (empty when the copy is exact)."""
    want = {p.name: p.read_bytes() for p in _files(source)}
    have = {p.name: p.read_bytes() for p in _files(copy)} if copy.is_dir() else {}
    out = [f"{name}: missing from {copy.name}/" for name in want if name not in have]
    out += [f"{name}: differs from {source.name}/{name}" for name in want if name in have and have[name] != want[name]]
    out += [f"{name}: not in {source.name}/" for name in have if name not in want]
    return out


def sync(source: Path = SOURCE, copy: Path = COPY) -> list[Path]:
    """Make ``copy`` hold exactly ``source``'s workflow files; returns the files written or removed."""
    copy.mkdir(exist_ok=True)
    changed = []
    for path in _files(copy):
        if not (source / path.name).is_file():
            path.unlink()
            changed.append(path)
    for path in _files(source):
        target = copy / path.name
        if not target.is_file() or target.read_bytes() != path.read_bytes():
            shutil.copyfile(path, target)
            changed.append(target)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report differences (exit status 1 if any)")
    args = ap.parse_args(argv)
    if args.check:
        problems = differences()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for path in sync():
        print("updated", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
