"""Nothing a user has is lost: backups never overwrite, new names are numbered, file names are checked,
a bank is only replaced by a newer version of itself, two writers never interleave, and host folders are
never left."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlora_core.files import (
    FileBusyError,
    FileLock,
    file_stem,
    folder_inside,
    keep_backup,
    numbered_path,
    stem_for,
)
from seqlora_core.method.bank import ConceptBank, header_digest
from seqlora_core.method.bank_update import BankBusyError, BankChangedError, updating_bank
from tests._banks import synthetic_bank

ROOT = Path(__file__).resolve().parents[1]


def test_backups_are_numbered_and_never_overwritten(tmp_path: Path) -> None:
    f = tmp_path / "b.safetensors"
    assert keep_backup(f) is None
    for i in range(3):
        f.write_text(f"v{i}")
        keep_backup(f)
    assert [p.name for p in sorted(tmp_path.glob("b.safetensors.bak*"))] == [
        "b.safetensors.bak",
        "b.safetensors.bak2",
        "b.safetensors.bak3",
    ]
    assert (tmp_path / "b.safetensors.bak").read_text() == "v0"
    assert (tmp_path / "b.safetensors.bak3").read_text() == "v2"


def test_numbered_paths_are_free(tmp_path: Path) -> None:
    assert numbered_path(tmp_path, "bank", ".safetensors").name == "bank.safetensors"
    (tmp_path / "bank.safetensors").write_text("x")
    assert numbered_path(tmp_path, "bank", ".safetensors").name == "bank_00001.safetensors"
    (tmp_path / "bank_00007.safetensors").write_text("x")
    assert numbered_path(tmp_path, "bank", ".safetensors").name == "bank_00008.safetensors"


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty file name"),
        ("   ", "empty file name"),
        ("..", "names a folder or a path"),
        ("../escape", "names a folder or a path"),
        ("a/b", "names a folder or a path"),
        ("a\\b", "names a folder or a path"),
        ("/etc/passwd", "names a folder or a path"),
        ("a:b", "which a file name cannot hold"),
        ("what?", "which a file name cannot hold"),
        ("bell\x07", "which a file name cannot hold"),
        (".hidden", "starts with '.'"),
        ("x" * 121, "use at most 120"),
        ("CON", "reserved device name"),
    ],
)
def test_file_names_a_user_types_are_checked(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="filename: .*" + message.replace("?", r"\?").replace(".", r"\.")):
        file_stem(text, "filename")


def test_plain_file_names_pass_unchanged() -> None:
    assert file_stem("my concepts (v2).safetensors", "name") == "my concepts (v2)"
    assert file_stem("hund_äöü", "name") == "hund_äöü"


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=2, max_size=6, unique=True))
def test_distinct_names_never_share_a_file(names: list[str]) -> None:
    stems = [stem_for(n) for n in names]
    assert len(set(stems)) == len(stems)
    for stem in stems:
        assert file_stem(stem, "x", suffix="") == stem  # always a safe file name


def test_a_second_writer_fails_naming_the_holder(tmp_path: Path) -> None:
    target = tmp_path / "bank.safetensors"
    with FileLock(target, "training 'dog'"):
        with pytest.raises(FileBusyError) as err:
            FileLock(target, "other").acquire()
        assert f"process {os.getpid()}" in str(err.value) and "training 'dog'" in str(err.value)
    with FileLock(target, "again"):  # released: free again
        pass
    assert not (tmp_path / ".bank.safetensors.lock").exists()


def test_a_killed_holder_releases_its_lock(tmp_path: Path) -> None:
    target = tmp_path / "bank.safetensors"
    code = textwrap.dedent(
        f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("files", {str(ROOT / "seqlora_core" / "files.py")!r})
        files = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(files)  # the module alone: stdlib only, starts in a blink
        files.FileLock({str(target)!r}, "holder").acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FileBusyError, match=f"process {proc.pid}"):
            FileLock(target).acquire()
        proc.kill()
        proc.wait(30)
        with FileLock(target, "after", timeout=5):
            pass
    finally:
        proc.kill()


def test_a_waiting_writer_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    import threading

    target = tmp_path / "bank.safetensors"
    first = FileLock(target, "first").acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    with FileLock(target, "second", timeout=20):
        assert time.monotonic() - t0 >= 0.4


# ----------------------------------------------------------------------------------------------- bank updates


def test_a_bank_is_only_replaced_by_a_newer_version_of_itself(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    synthetic_bank().save(path)
    with updating_bank(path, "test") as update:
        newer = update.bank.without("c0")
        update.commit(newer)
    assert ConceptBank.load(path).names() == ["c1"]
    other = synthetic_bank(3)  # not made from the file's bank
    before = header_digest(path)
    with updating_bank(path, "test") as update, pytest.raises(BankChangedError, match="not made from the one"):
        update.commit(other)
    assert header_digest(path) == before


def test_a_change_by_another_writer_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    synthetic_bank().save(path)
    with updating_bank(path, "test") as update:
        new = update.bank.without("c1")
        synthetic_bank(3).save(path)  # another program writes without the lock
        changed = header_digest(path)
        with pytest.raises(BankChangedError, match="was changed by another program"):
            update.commit(new)
    assert header_digest(path) == changed


def test_a_bank_that_appears_while_one_works_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "new.safetensors"
    with updating_bank(path, "test") as update:
        assert update.bank is None
        synthetic_bank(1).save(path)
        with pytest.raises(BankChangedError, match="was created"):
            update.commit(synthetic_bank(2))
    assert ConceptBank.load(path).names() == ["c0"]


def test_two_updates_of_one_bank_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    synthetic_bank().save(path)
    busy = pytest.raises(BankBusyError, match=f"in use by process {os.getpid()}.*training 'a'")
    with updating_bank(path, "training 'a'"), busy, updating_bank(path, "training 'b'"):
        pass


def test_remove_keeps_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    synthetic_bank().save(path)
    old = path.read_bytes()
    with updating_bank(path, "remove") as update:
        backup = update.commit(update.bank.without("c0"), backup=True)
    assert backup.read_bytes() == old and ConceptBank.load(path).names() == ["c1"]


def test_in_memory_banks_with_nan_fail_their_check() -> None:
    bank = synthetic_bank()
    bank.concepts[0].layers[bank.layers[0].name].B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bank.check()
    assert torch.isnan(bank.concepts[0].layers[bank.layers[0].name].B).any()


# ----------------------------------------------------------------------------------------------- host folders


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "input"
    (base / "seqlora" / "dog").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    return base, tmp_path / "secret"


def _inside(text: str, base: Path) -> Path:
    return folder_inside(text, base, [base / "seqlora"], "folder", "input/seqlora", "image folder")


def test_folders_inside_the_root_are_allowed(roots) -> None:
    base, _ = roots
    assert _inside("seqlora/dog", base) == (base / "seqlora" / "dog").resolve()
    assert _inside(str(base / "seqlora" / "dog"), base) == (base / "seqlora" / "dog").resolve()


@pytest.mark.parametrize("text", ["/etc", "..", "seqlora/../..", "seqlora", "~", "~/x", "other", "seqlora/../other"])
def test_folders_outside_the_root_are_refused(roots, text: str) -> None:
    base, _ = roots
    (base / "other").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="folder: "):
        _inside(text, base)


def test_links_out_of_the_root_are_refused(roots) -> None:
    base, secret = roots
    (base / "seqlora" / "link").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the folders images are read from"):
        _inside("seqlora/link", base)


def test_messages_show_no_absolute_paths(roots) -> None:
    base, secret = roots
    for text in (str(secret), "seqlora/missing"):
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            _inside(text, base)
        assert str(base) not in str(err.value)
