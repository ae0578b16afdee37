"""Changing a bank file safely: read, change, write back, with nothing lost on the way.

``with updating_bank(path, "train 'dog'") as update:`` takes an exclusive lock on the file (a second
writer gets an error naming this one), reads the bank (None when the file does not exist yet), and
``update.commit(new_bank)`` writes the new version atomically and durably, after checking that the file
on disk is still the one read and that ``new_bank`` is a version of that bank (same layers). Whatever is
interrupted, the file is the old bank or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..files import FileBusyError, FileLock, keep_backup, remove_stale_temps
from .bank import BankError, BankMismatchError, ConceptBank, header_digest


class BankBusyError(BankError):
    """Another process is changing the bank; the message names it."""


class BankChangedError(BankError):
    """The bank file changed (or appeared) after it was read; writing would lose that change."""


@dataclass
class BankUpdate:
    """One read-modify-write of a bank file, under its lock."""

    path: Path
    bank: ConceptBank | None  # as read; None when the file did not exist
    digest: str | None  # the header digest of the file as read

    def commit(self, new: ConceptBank, backup: bool = False) -> Path | None:
        """Write ``new`` over the file (keeping a numbered ``.bak`` copy first when ``backup``); returns the
        backup's path. BankChangedError when the file is no longer the one read, BankMismatchError when
        ``new`` has other layers than the bank read."""
        if self.bank is not None and new.fingerprint != self.bank.fingerprint:
            raise BankMismatchError(
                f"{self.path.name}: the new bank has other layers than the one read "
                f"({new.fingerprint} vs {self.bank.fingerprint}); write it to another file"
            )
        if self.bank is not None and new.origin != self.bank.origin:
            raise BankChangedError(
                f"{self.path.name}: the bank to write was not made from the one in the file; write it to "
                "another file instead"
            )
        now = header_digest(self.path)
        if now != self.digest:
            what = "was created" if self.digest is None else ("was deleted" if now is None else "was changed")
            raise BankChangedError(
                f"{self.path.name} {what} by another program while this one worked on it; nothing was written. "
                "Run the command again to work on the bank as it is now"
            )
        saved = keep_backup(self.path) if backup else None
        new.save(self.path)
        self.digest = header_digest(self.path)
        self.bank = new
        return saved


@contextmanager
def updating_bank(path: str | os.PathLike, purpose: str = "", wait: float = 0.0) -> Iterator[BankUpdate]:
    """Lock ``path`` (waiting up to ``wait`` seconds for another writer), read it, yield a :class:`BankUpdate`.

    BankBusyError names the process that holds the lock when it is not released in time.
    """
    path = Path(path)
    try:
        lock = FileLock(path, purpose, wait).acquire()
    except FileBusyError as e:
        raise BankBusyError(f"bank {e}") from None
    try:
        remove_stale_temps(path)
        digest = header_digest(path)
        bank = ConceptBank.load(path) if digest is not None else None
        if bank is not None:
            digest = bank.origin
        yield BankUpdate(path, bank, digest)
    finally:
        lock.release()
