"""Safe output: atomic writes, an exclusive claim on each output, and no litter.

Every output is written beside its final path under a name of spdelta's own
(``.<name>.<12 hex>.tmp``) and renamed into place. While a run writes ``path`` it holds
an ``flock`` on ``.<name>.lock`` beside it (:func:`claim`): a second run on the same
output fails at once, and a run killed with SIGKILL holds nothing (the kernel drops the
lock). Temp files and directories of spdelta's naming found there at claim time are
left by a killed run (a live one would hold the lock) and are removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from spdelta.errors import NotRegularFileError, OutputBusyError, OutputExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock files instead
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_write",
    "check_regular",
    "claim",
    "is_temp_of",
    "make_temp_dir",
    "open_input",
    "refuse_overlap",
    "remove_stale",
    "user_os_error",
]


def user_os_error(path: str | os.PathLike[str], e: OSError) -> OSError:
    """``e`` reworded to name the user's ``path``, not an internal temp or lock file.

    Example:
        >>> str(user_os_error("out.st", PermissionError(13, "Permission denied", ".x.tmp")))
        "[Errno 13] cannot write 'out.st': Permission denied"
    """
    err = type(e)(e.errno, f"cannot write {os.fspath(path)!r}: {e.strerror or e}")
    return err


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def _not_regular(path: str | os.PathLike[str], mode: int, what: str) -> NotRegularFileError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return NotRegularFileError(f"{os.fspath(path)!r} is {kind}, not a regular file; give "
                               f"{what}.")


def check_regular(path: str | os.PathLike[str], what: str = "a file") -> None:
    """Refuse a path that is not a regular file (a FIFO, socket, device or directory).

    Reading a FIFO blocks until something writes to it, and a device has no size (``stat``
    says 0 bytes for ``/dev/zero``): such inputs are refused at once, before any read.

    Raises:
        NotRegularFileError: ``path`` exists and is not a regular file.
        OSError: ``path`` cannot be examined (e.g. it does not exist).

    Example:
        >>> check_regular("/dev/zero", "a delta file")
        Traceback (most recent call last):
        ...
        spdelta.errors.NotRegularFileError: '/dev/zero' is a character device, not a regular \
file; give a delta file.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)


def open_input(path: str | os.PathLike[str], what: str = "a file") -> BinaryIO:
    """Open a regular file for binary reading; refuse a FIFO, socket or device at once.

    The path is checked with ``stat``, then opened non-blocking (so a FIFO swapped in
    meanwhile cannot hang the open), checked again with ``fstat`` on the descriptor, and
    switched back to blocking reads.

    Raises:
        NotRegularFileError: ``path`` is not a regular file.
        OSError: ``path`` cannot be opened.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> open(p, "wb").close()
        >>> with open_input(p) as f:
        ...     f.read()
        b''
    """
    check_regular(path, what)  # names a socket, which cannot even be opened
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def refuse_overlap(output: str | os.PathLike[str],
                   inputs: Mapping[str, str | os.PathLike[str]]) -> None:
    """Refuse an output tree that is, holds or lies inside one of the inputs.

    Replacing such an output would delete the input (``--force``), or copying the input
    into it would copy the output into itself.

    Args:
        output: The file or directory to write.
        inputs: Role (e.g. ``"base"``, ``"delta"``) -> input path.

    Raises:
        OutputExistsError: The output and an input overlap.

    Example:
        >>> refuse_overlap("work", {"base": "work/base"})
        Traceback (most recent call last):
        ...
        spdelta.errors.OutputExistsError: the output 'work' contains the base 'work/base'; \
write the output outside the inputs.
    """
    out = os.path.realpath(output)
    for role, path in inputs.items():
        src = os.path.realpath(path)
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            how = "is" if src == out else "contains"
        elif out.startswith(src.rstrip(os.sep) + os.sep):
            how = "lies inside"
        else:
            continue
        raise OutputExistsError(f"the output {os.fspath(output)!r} {how} the {role} "
                                f"{os.fspath(path)!r}; write the output outside the inputs.")


def _sibling(path: str | os.PathLike[str], suffix: str) -> str:
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{base}{suffix}")


def make_temp_dir(path: str | os.PathLike[str], kind: str = "tmp") -> str:
    """Create a new directory ``.<name>.<12 hex>.<kind>`` beside ``path`` (mode per umask).

    Example:
        >>> import os, tempfile
        >>> d = make_temp_dir(os.path.join(tempfile.mkdtemp(), "out"))
        >>> os.path.basename(d).startswith(".out.") and d.endswith(".tmp")
        True
    """
    while True:
        tmp = _sibling(path, f".{secrets.token_hex(6)}.{kind}")
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        except OSError as e:
            raise user_os_error(path, e) from e
        return tmp


def _stale_pattern(base: str) -> re.Pattern[str]:
    """Names spdelta gives to the temp files and dirs of an output ``base`` (old ones too)."""
    name = re.escape(base)
    return re.compile(rf"\.{name}\.(?:[0-9a-f]{{12}}\.(?:tmp|old)|[a-z0-9_]{{8}}\.tmp|old)")


def is_temp_of(entry: str, base: str) -> bool:
    """Whether the name ``entry`` is one spdelta gives a temp file or dir of output ``base``.

    Example:
        >>> is_temp_of(".a.st.0123456789ab.tmp", "a.st"), is_temp_of("a.st.tmp", "a.st")
        (True, False)
    """
    return _stale_pattern(base).fullmatch(entry) is not None


def remove_stale(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temp files and dirs of spdelta's naming beside ``path``; return their names.

    Call it only while holding :func:`claim` on ``path``: then no live run owns them.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> open(os.path.join(d, ".a.st.0123456789ab.tmp"), "w").close()
        >>> remove_stale(os.path.join(d, "a.st")), os.listdir(d)
        (['.a.st.0123456789ab.tmp'], [])
    """
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    for entry in sorted(os.listdir(folder)):
        if not is_temp_of(entry, base):
            continue
        full = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(entry)
    return removed


def _lock(lock: str, path: str) -> int:
    """An open, exclusively locked descriptor of the lock file ``lock``, or raise."""
    busy = OutputBusyError(
        f"{path!r} is being written by another spdelta run (it holds {lock!r}); wait for it "
        "to finish, or choose another output.")
    while True:
        flags = os.O_RDWR | os.O_CREAT | (0 if fcntl is not None else os.O_EXCL)
        try:
            fd = os.open(lock, flags, 0o666)
        except FileExistsError:  # pragma: no cover - Windows only
            raise busy from None
        except OSError as e:
            raise user_os_error(path, e) from e
        if fcntl is None:  # pragma: no cover
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise busy from None
            raise user_os_error(path, e) from e
        # Its last holder may have removed the file between our open and flock: retry.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def claim(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``path`` (a file or directory to write) exclusively for the block.

    Takes an ``flock`` on ``.<name>.lock`` beside ``path`` (created, and removed at the
    end), then removes what killed runs left there (:func:`remove_stale`). The folder
    of ``path`` must exist.

    Raises:
        OutputBusyError: Another process holds the claim.
        OSError: The folder is missing or not writable (the message names ``path``).

    Example:
        >>> import os, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "out.st")
        >>> with claim(out):
        ...     with claim(out):
        ...         pass  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spdelta.errors.OutputBusyError: '...out.st' is being written by another spdelta run ...
    """
    path = os.fspath(path)
    lock = _sibling(path, ".lock")
    fd = _lock(lock, path)
    try:
        remove_stale(path)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a waiting run re-opens a new file
        os.close(fd)


def _open_temp(path: str) -> tuple[str, BinaryIO]:
    """Create a new sibling temp file (mode follows the umask, unlike ``mkstemp``)."""
    folder, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        return tmp, os.fdopen(fd, "wb")


def _fsync_dir(folder: str) -> None:
    """Persist the rename; a no-op where directories cannot be opened (Windows)."""
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


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:  # link fails atomically if ``path`` appeared meanwhile
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(
            f"{path!r} already exists; pass overwrite=True (--force) to replace it."
        ) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(path):
            raise OutputExistsError(
                f"{path!r} already exists; pass overwrite=True (--force) to replace it."
            ) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing so that it appears complete or not at all.

    Bytes go to a temp file in the same directory, which is flushed, fsynced and
    renamed over ``path`` when the block exits normally. On any exception (including
    ``KeyboardInterrupt``) the temp file is removed and an existing ``path`` is untouched.

    Args:
        path: Destination file.
        overwrite: Replace an existing ``path``; when false and it exists, raise.

    Yields:
        A binary file object open for writing.

    Raises:
        OutputExistsError: ``overwrite`` is false and ``path`` exists (checked before
            writing and again, atomically where the file system allows, at the end).
        OSError: The directory is not writable or the disk is full.

    Example:
        >>> import os, pathlib, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> with atomic_write(path) as f:
        ...     _ = f.write(b"abc")
        >>> pathlib.Path(path).read_bytes(), len(os.listdir(os.path.dirname(path)))
        (b'abc', 1)
    """
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(
            f"{path!r} already exists; pass overwrite=True (--force) to replace it."
        )
    try:
        tmp, f = _open_temp(path)
    except OSError as e:
        raise user_os_error(path, e) from e
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
