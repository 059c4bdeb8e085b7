"""Committing a command's output (a directory or a file) without ever deleting what the command did not create.

Every command that writes an OUTPUT goes through :class:`Output`:

1. :meth:`Output.claim` at the start: cleans up after earlier runs that were killed (see below),
   refuses an OUTPUT that exists unless the command may replace it (``--overwrite``; export files),
   records what is at OUTPUT (its identity: device, inode, kind) and checks that the directory is
   writable, all before any work is done.
2. :meth:`Output.staged` yields a staging path beside OUTPUT (``.NAME.partial-PID``); the command
   writes there. On failure the staging path is removed and OUTPUT is untouched.
3. At the end the staging path takes OUTPUT's place only if OUTPUT is still what it was at the
   start. Anything else that appeared there is left alone and the error names where the finished
   result was kept (``NAME.result-PID``).

Replacing an existing OUTPUT is one atomic ``renameat2(RENAME_EXCHANGE)``: the old copy moves to
the staging name and is then removed. Where the filesystem cannot exchange, the old copy is
renamed to ``.NAME.old-PID`` first. Either way a kill at any instant leaves files that the next
run's :meth:`Output.claim` resolves: a ``.NAME.old-PID`` of a dead process is put back when OUTPUT
is missing and removed otherwise; a ``.NAME.partial-PID`` of a dead process is removed (it holds
either an unfinished result or an old copy that was already replaced).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dsv2cli.errors import InputError

PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"
RESULT_MARK = ".result-"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc / not Linux: plain renames
    _renameat2 = None


@dataclass(frozen=True)
class _Identity:
    """What a path names: enough to tell that something else was put there."""

    device: int
    inode: int
    mode: int
    size: int
    mtime_ns: int


def identity(path: Path) -> _Identity | None:
    """The identity of what ``path`` names (a symlink itself, not its target), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):  # a directory's size and mtime change as files are added: compare the inode only
        return _Identity(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), 0, 0)
    return _Identity(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)


# The file-system operations of the commit, as module functions so that tests can inject faults into each.


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2``; False where the system or filesystem does not offer ``flags``."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename(source: Path, target: Path) -> None:
    os.rename(source, target)


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _leftovers(path: Path, mark: str) -> list[Path]:
    """``.NAME<mark>PID`` beside ``path`` whose process is gone."""
    found = []
    for candidate in path.parent.glob(f".{path.name}{mark}*"):
        pid = candidate.name[len(path.name) + 1 + len(mark) :]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):  # not inside a commit now
            found.append(candidate)
    return sorted(found)


def recover(path: Path) -> None:
    """Resolve what killed runs left beside ``path``: restore an old copy when ``path`` is missing, remove the rest."""
    for old in _leftovers(path, OLD_MARK):
        if not os.path.lexists(path):
            _rename(old, path)
        else:
            _remove(old)
    for partial in _leftovers(path, PARTIAL_MARK):
        _remove(partial)


class Output:
    """One OUTPUT path (a directory or a file) and what was there when the command started."""

    def __init__(self, path: Path, kind: str, replace: bool, what: str) -> None:
        self.path = path
        self.kind = kind
        self.replace = replace
        self.what = what
        self.expected: _Identity | None = None
        self.only_if_empty = False  # an empty directory was there: replace it only if it still is
        self.staging = path.parent / f".{path.name}{PARTIAL_MARK}{os.getpid()}"

    @classmethod
    def claim(
        cls,
        path: str | Path,
        kind: str = "dir",
        replace: bool = False,
        what: str = "OUTPUT",
        allow_empty: bool = False,
        hint: str | None = None,
    ) -> Output:
        """Check ``path`` before any work: absent, or (``replace``) an existing ``kind``; its directory writable.

        ``kind`` is ``"dir"`` or ``"file"``; ``what`` names the option or argument in errors; ``allow_empty``
        takes an existing empty directory as if it were absent; ``hint`` replaces the hint for an existing OUTPUT.
        """
        path = Path(os.path.abspath(Path(path).expanduser()))
        if path.parent == path:
            raise InputError(f"{what} {path} is the root directory", hint=f"choose another {what}")
        if not path.parent.is_dir():
            raise InputError(f"cannot write {what} {path}: directory {path.parent} does not exist", hint="create it first")
        output = cls(path, kind, replace, what)
        try:
            recover(path)
        except OSError as exc:
            raise _os_error(output, "could not clean up after an earlier run", exc) from None
        current = identity(path)
        if current is not None and not replace and allow_empty and stat.S_ISDIR(current.mode) and _empty_dir(path):
            output.only_if_empty = True
        elif current is not None:
            if not replace:
                full = " and is not empty" if allow_empty and stat.S_ISDIR(current.mode) else ""
                raise InputError(
                    f"{what} {path} already exists{full}",
                    hint=hint or f"choose another {what}, or pass `overwrite` to replace it",
                )
            if kind == "dir" and not (stat.S_ISDIR(current.mode) or stat.S_ISLNK(current.mode)):
                raise InputError(f"{what} {path} exists and is not a directory", hint=f"choose another {what}")
            if kind == "file" and path.is_dir():
                raise InputError(f"{what} {path} is a directory", hint="name a file to write")
        output.expected = current
        try:  # writable: what the commit will do, tried now rather than after the work
            os.mkdir(output.staging)
            os.rmdir(output.staging)
        except OSError as exc:
            raise _os_error(output, f"cannot write in {path.parent}", exc) from None
        return output

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A staging directory (or a staging file path, not yet created) that becomes OUTPUT when the body succeeds."""
        try:
            if self.kind == "dir":
                os.mkdir(self.staging)
            yield self.staging
            self._flush()
        except OSError as exc:  # the body's own writes, or flushing them
            _remove_quietly(self.staging)
            raise _os_error(self, f"could not write {self.what} {self.path}", exc) from None
        except BaseException:
            _remove_quietly(self.staging)
            raise
        self._commit()

    def _flush(self) -> None:
        """Everything staged on disk before a rename makes it visible."""
        if self.kind == "file":
            _fsync(self.staging)
            return
        for root, _, files in os.walk(self.staging):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))

    def _commit(self) -> None:
        try:
            if identity(self.path) != self.expected:
                self._changed()
            if self.expected is None:
                self._place()
            else:
                self._swap()
            _fsync(self.path.parent)
        except OSError as exc:
            _remove_quietly(self.staging)
            raise _os_error(self, f"could not move the result into place at {self.path}", exc) from None
        self.expected = identity(self.path)  # the next commit (a later checkpoint) replaces what this one wrote
        self.only_if_empty = False  # OUTPUT now holds this command's own result, which a later commit replaces

    def _place(self) -> None:
        """Rename the staging path to an absent OUTPUT, never over something that appeared meanwhile."""
        if _rename2(self.staging, self.path, _RENAME_NOREPLACE):
            return
        if self.kind == "file":  # a hard link fails if the name exists
            try:
                os.link(self.staging, self.path)
            except FileExistsError:
                self._changed()
            os.unlink(self.staging)
            return
        if os.path.lexists(self.path):
            self._changed()
        _rename(self.staging, self.path)

    def _swap(self) -> None:
        """Replace OUTPUT by the staging path; the old copy is removed, or restored if anything fails."""
        if _rename2(self.staging, self.path, _RENAME_EXCHANGE):
            if not self._is_expected(self.staging):  # replaced between the check and the exchange: undo
                _rename2(self.staging, self.path, _RENAME_EXCHANGE)
                self._changed()
            _remove_quietly(self.staging)  # the old copy; what cannot be removed now, the next run's claim removes
            return
        old = self.path.parent / f".{self.path.name}{OLD_MARK}{os.getpid()}"
        _rename(self.path, old)
        if not self._is_expected(old):
            _rename(old, self.path)
            self._changed()
        try:
            _rename(self.staging, self.path)
        except BaseException:
            _rename(old, self.path)
            raise
        _remove_quietly(old)

    def _is_expected(self, old: Path) -> bool:
        """Whether the copy moved out of OUTPUT is the one found at the start (and still empty, if it was)."""
        return identity(old) == self.expected and (not self.only_if_empty or _empty_dir(old))

    def _changed(self) -> None:
        """OUTPUT is no longer what it was at the start: keep both, say where the result is."""
        kept = self.path.parent / f"{self.path.name}{RESULT_MARK}{os.getpid()}"
        _rename(self.staging, kept)
        raise InputError(
            f"{self.what} {self.path} changed while this command ran; it was left alone and the result is in {kept}",
            hint=f"move the result where you want it, or run again with another {self.what}",
        )


def _empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _remove_quietly(path: Path) -> None:
    try:
        _remove(path)
    except OSError:
        pass


def _os_error(output: Output, doing: str, exc: OSError) -> InputError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return InputError(f"{doing}: no space left on the device", hint="free some space or choose another disk")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return InputError(f"{doing}: {reason}", hint=f"choose an {output.what} on a writable disk")
    return InputError(f"{doing}: {reason}", hint=f"choose another {output.what}")


def write_file(path: str | Path, data: bytes, what: str = "`output`") -> Path:
    """Write ``data`` to the file ``path`` through :class:`Output` (replacing a file that was there)."""
    output = Output.claim(path, kind="file", replace=True, what=what)
    with output.staged() as staging:
        staging.write_bytes(data)
    return output.path
