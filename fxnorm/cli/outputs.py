"""The files the ``fxnorm`` command writes: checked before anything is loaded, written all or none.

- :func:`check_outputs`: every output (``-o``, ``--export``, ``--onnx``) differs from the others and
  from every input file, and its folder exists and can be written; otherwise a
  :class:`~fxnorm.errors.UsageError` (exit 2) before any work.
- :func:`write_outputs`: each output is written to a hidden temporary file beside it, then all are
  renamed into place. When any writer fails (or Ctrl-C arrives), every temporary file is removed and
  no output of the run is left behind; existing files are replaced only once every output is ready.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> out = os.path.join(folder, "a.txt")
    >>> check_outputs({"-o": out}, {})
    >>> write_outputs([(out, lambda tmp: open(tmp, "w").write("hi"))])
    [...a.txt']
    >>> sorted(os.listdir(folder))
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

from ..errors import OutputError, UsageError
from .console import cause_of

__all__ = ["check_outputs", "temporary_path", "write_outputs", "same_file"]


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (after resolving links; hard links too, when both exist).

    Example:
        >>> same_file("x/../y.pt", "y.pt"), same_file("a.pt", "b.pt")
        (True, False)
    """
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(flag: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path)) or os.sep
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: give a file name")
    if not os.path.exists(folder):
        raise UsageError(f"cannot write {flag} {path}: directory {folder} does not exist")
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {flag} {path}: {folder} is not a directory")
    try:  # the only reliable test (permissions, read-only file systems, root): create a file there
        fd, probe = tempfile.mkstemp(prefix=".fxnorm-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"cannot write {flag} {path}: cannot create files in {folder} ({err.strerror or err})") from None


def check_outputs(outputs: Mapping[str, str], inputs: Mapping[str, str]) -> None:
    """Fail (:class:`~fxnorm.errors.UsageError`) unless every output is its own writable file.

    ``outputs`` and ``inputs`` map an option (``-o``, ``MODEL``, ``--weights``...) to its path.

    Example:
        >>> check_outputs({"-o": "m.pt", "--export": "m.pt"}, {})
        Traceback (most recent call last):
        ...
        fxnorm.errors.UsageError: -o m.pt and --export m.pt are the same file: give each output its own path
    """
    seen: list[tuple[str, str]] = []
    for flag, path in outputs.items():
        for other_flag, other in seen:
            if same_file(path, other):
                raise UsageError(f"{other_flag} {other} and {flag} {path} are the same file: give each output "
                                 "its own path")
        for in_flag, in_path in inputs.items():
            if same_file(path, in_path):
                raise UsageError(f"{flag} {path} is the input {in_flag}: writing it would destroy the input; "
                                 "give another output path")
        seen.append((flag, path))
    for flag, path in outputs.items():
        _check_writable(flag, path)


def temporary_path(path: str) -> str:
    """A hidden file beside ``path`` with its extension (writers that look at it still work).

    Example:
        >>> os.path.basename(temporary_path("out/model.pt2")).startswith(".model.tmp-")
        True
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def write_outputs(writers: Sequence[tuple[str, Callable[[str], object]]]) -> list[str]:
    """Run each ``write(temporary_path)`` then rename every file into place; all or nothing.

    Returns:
        The paths written, in order.

    Raises:
        OutputError: a writer failed (its fxnorm error or ``Type: message`` in one line); no
            temporary file and no output of this run is left. ``KeyboardInterrupt`` cleans up the same
            way and is raised again.

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> def broken(tmp):
        ...     open(tmp, "w").write("half")
        ...     raise OSError("disk full")
        >>> write_outputs([(out, lambda tmp: open(tmp, "w").write("ok")), (out + "2", broken)])
        Traceback (most recent call last):
        ...
        fxnorm.errors.OutputError: writing ...x.bin2 failed: OSError: disk full; nothing was saved
        >>> os.listdir(os.path.dirname(out))
        []
    """
    temps: list[str] = []
    placed: list[str] = []
    try:
        for path, write in writers:
            temps.append(temporary_path(path))
            try:
                write(temps[-1])
            except Exception as err:
                raise OutputError(f"writing {path} failed: {cause_of(err)}; nothing was saved") from err
        for (path, _), temp in zip(writers, temps):
            os.replace(temp, path)
            placed.append(path)
    except BaseException:
        _remove(temps)
        _remove(placed)
        raise
    return placed
