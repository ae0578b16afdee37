"""Safe file handling: nothing a user has is lost, and two writers never interleave.

- :func:`atomic_write_bytes`: readers see the old file or the new one, never a part of either, and the
  new one is on disk (file and folder synced) when the call returns.
- :func:`keep_backup`: a copy of a file before it is replaced, under a name no earlier backup has.
- :func:`numbered_path`: a new file name (``name.ext``, else ``name_00001.ext``, ...) that is free.
- :func:`file_stem`, :func:`stem_for`: file names from what a user typed (checked, with a clear error)
  and from concept names (made safe; distinct names never give one file).
- :func:`folder_inside`: a folder a user named, only when it lies inside the folders a host allows.
- :class:`FileLock`: an exclusive lock around a read-modify-write; a second writer waits or gets an
  error that names the process holding it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from types import TracebackType

MAX_STEM = 120  # characters of a file name we create (most file systems allow 255 bytes)
_FORBIDDEN = set('/\\:*?"<>|')  # path separators and what Windows refuses in a name
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` via a temp file in the same folder, fsync, rename over ``path``, fsync the folder.

    An existing file keeps its permission bits; a new one gets 0644 (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files a killed :func:`atomic_write_bytes` of ``path`` left behind; call it only while
    holding ``path``'s :class:`FileLock` (no other writer is then half-way through)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file()]
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale


def keep_backup(path: str | os.PathLike) -> Path | None:
    """Copy an existing file to ``<file>.bak`` (``.bak2``, ``.bak3``, ... when taken) before it is replaced.

    No backup is ever overwritten. Returns the backup's path, or None when there is no file to keep.
    """
    path = Path(path)
    if not path.is_file():
        return None
    n = 1
    while True:
        bak = path.with_name(f"{path.name}.bak{'' if n == 1 else n}")
        if not bak.exists():
            break
        n += 1
    tmp = bak.with_name(f".{bak.name}.tmp")
    shutil.copy2(path, tmp)
    os.replace(tmp, bak)
    _fsync_dir(path.parent)
    return bak


def numbered_path(folder: str | os.PathLike, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix`` when free, else ``stem_00001+suffix`` with the number after the highest taken."""
    folder = Path(folder)
    plain = folder / f"{stem}{suffix}"
    if not plain.exists():
        return plain
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})" + re.escape(suffix))
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    while (folder / f"{stem}_{n:05d}{suffix}").exists():
        n += 1
    return folder / f"{stem}_{n:05d}{suffix}"


def file_stem(text: str, field: str, suffix: str = ".safetensors") -> str:
    """The file name a user typed, without ``suffix``; ValueError naming ``field`` and the fix otherwise.

    Refused: empty names, folders ('/', '\\\\', '..'), characters Windows forbids (``: * ? " < > |``),
    control characters, names starting with '.', names longer than ``MAX_STEM`` characters and Windows'
    reserved device names. Nothing is silently replaced, so two names never give one file.
    """
    name = text.strip()
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)].rstrip()
    example = "e.g. 'my_concepts'"
    if not name:
        raise ValueError(f"{field}: empty file name; give a name, {example}")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{field}: {name[:60]!r} names a folder or a path; give a plain file name, {example}")
    bad = sorted({ch for ch in name if ch in _FORBIDDEN or unicodedata.category(ch)[0] == "C"})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad[:5])
        raise ValueError(
            f"{field}: {name[:60]!r} holds {shown}, which a file name cannot hold; use letters, digits, - or _"
        )
    if name.startswith("."):
        raise ValueError(f"{field}: {name[:60]!r} starts with '.', which hides the file; {example}")
    if len(name) > MAX_STEM:
        raise ValueError(f"{field}: the name has {len(name)} characters; use at most {MAX_STEM}")
    if name.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise ValueError(f"{field}: {name!r} is a reserved device name on Windows; choose another name")
    return name


def stem_for(name: str, limit: int = MAX_STEM) -> str:
    """A file stem for a concept (or other) name: the name itself when it is a safe file name in lower case,
    else its safe characters plus a short hash of the whole name, so distinct names never share a file (on
    file systems that ignore case too)."""
    try:
        stem = file_stem(name, "name", suffix="")
        if len(stem) <= limit and stem == name and stem == stem.lower():
            return stem
    except ValueError:
        pass
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-_ " else "_" for ch in name).strip(" _")
    return f"{safe[: limit - 9]}-{digest}" if safe else digest


def folder_inside(text: str, base: Path, roots: list[Path], field: str, shown: str, what: str = "folder") -> Path:
    """The folder ``text`` names (relative to ``base``, or absolute) when, links resolved, it lies strictly
    inside one of ``roots``; ValueError naming ``field`` when it does not, FileNotFoundError when it is not
    a folder. Messages show ``text`` and ``shown`` (how the user knows the roots), never absolute paths."""
    name = text.strip()
    if not name:
        raise ValueError(f"{field}: empty; give a {what}, e.g. 'seqlora/my_concept'")
    if name.startswith("~"):
        raise ValueError(f"{field}: {name!r}: '~' is not expanded here; give a folder inside {shown}")
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):  # a link loop
        raise ValueError(f"{field}: {name!r} cannot be resolved (a link loop?)") from None
    inside = False
    for root in roots:
        r = root.resolve()
        if resolved != r and resolved.is_relative_to(r):
            inside = True
    if not inside:
        raise ValueError(
            f"{field}: {name!r} is outside the folders images are read from; put the images in a folder "
            f"inside {shown} and give its name, e.g. 'seqlora/my_concept'"
        )
    if not resolved.is_dir():
        raise FileNotFoundError(f"{field}: {what} not found: {name!r}; create it inside {shown}")
    return resolved


# ------------------------------------------------------------------------------------------------- locks


class FileBusyError(OSError):
    """Another process holds the lock; the message names it and says what to do."""


def _holder_text(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    what = f" ({info['purpose']})" if info.get("purpose") else ""
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}{what}, since {when}"


class FileLock:
    """An exclusive lock on ``target`` (through ``.<name>.lock`` beside it), held by this process.

    ``timeout``: seconds to wait for another holder (0: fail at once). While held, the lock file names
    this process and ``purpose``, so a second writer's :class:`FileBusyError` says who holds it. The
    operating system releases the lock when a process ends in any way (kill -9 included), so it can never
    be left stale; the file itself is removed on release.
    """

    def __init__(self, target: str | os.PathLike, purpose: str = "", timeout: float = 0.0) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.purpose = purpose
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(self.timeout, 0.0)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if _try_lock(fd):
                try:  # the file may have been removed by its last holder between our open and lock
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                    self._write_holder(fd)
                    return self
                os.close(fd)
                continue
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise FileBusyError(
                    f"{self.target.name} is in use by {_holder_text(holder) if holder else 'another process'}; "
                    "wait until it finishes and run again"
                )
            time.sleep(0.2)

    def _write_holder(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose[:200],
            "since": time.time(),
            "command": " ".join(os.path.basename(a) for a in sys.argv[:3])[:200],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # under the lock: a waiter sees the inode change and retries
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw.decode("utf-8", "replace")) if raw else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
