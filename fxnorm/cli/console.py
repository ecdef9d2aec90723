"""Where the ``fxnorm`` command writes: reports to stdout (a table, or one JSON object), logs and
progress bars to stderr (silenced by ``--quiet``); errors as one line on stderr (and, with
``--format json``, as a JSON object on stdout); and its exit statuses.

Exit statuses: :data:`EXIT_OK` 0, :data:`EXIT_FAILURE` 1, :data:`EXIT_USAGE` 2 (bad arguments,
found before any work), :data:`EXIT_INTERRUPTED` 130 (Ctrl-C), :data:`EXIT_BROKEN_PIPE` 141 (the
reader of stdout went away, as a process killed by SIGPIPE reports in a shell).

Example:
    >>> Console(quiet=True).log("not shown")
    >>> one_line("\\x1b[1mbold\\x1b[0m first line\\n  second line")
    'bold first line'
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from ..errors import FxNormError

__all__ = [
    "Console",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE",
    "one_line",
    "cause_of",
    "details_of",
]

#: Exit statuses: success, failure (a one-line cause), bad arguments or unknown model.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Ctrl-C (128 + SIGINT, what a shell reports for an interrupted command); nothing is left behind.
EXIT_INTERRUPTED = 130
#: stdout was closed by its reader (``fxnorm inspect | head -2``): 128 + SIGPIPE, and nothing printed.
EXIT_BROKEN_PIPE = 141

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(text: str) -> str:
    """The first non-empty line of ``text``, without terminal escape codes, whitespace collapsed.

    Example:
        >>> one_line("\\n\\n  shape   mismatch\\n details")
        'shape mismatch'
    """
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def cause_of(err: BaseException) -> str:
    """One line for an exception: fxnorm's own message, or ``Type: first line`` for another.

    Example:
        >>> cause_of(ValueError("bad value\\nmore"))
        'ValueError: bad value'
    """
    text = one_line(str(err))
    if isinstance(err, FxNormError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def details_of(err: BaseException) -> list[str]:
    r"""The lines after the first of an fxnorm error (one per layer, for a strict fold); none for others.

    Example:
        >>> from fxnorm.errors import FoldError
        >>> details_of(FoldError("2 cannot fold:\n  bn1: why\n  bn2: why")), details_of(ValueError("a\nb"))
        (['  bn1: why', '  bn2: why'], [])
    """
    if not isinstance(err, FxNormError):
        return []
    lines = [line.rstrip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return lines[1:]


class Console:
    """stdout for reports, stderr for logs (silenced by ``quiet``), warnings and errors.

    ``json`` (``--format json``): errors also go to stdout as ``{"error": ..., "exit": ...}``, so that
    stdout always holds exactly one JSON object. ``saved`` lists the outputs written so far.
    """

    def __init__(self, quiet: bool = False, verbose: bool = False, json: bool = False) -> None:
        self.quiet, self.verbose, self.json_mode = quiet, verbose, json
        self.saved: list[str] = []
        #: False on the processes other than rank 0 of a ``torchrun``: no report, no warning (errors still go to stderr)
        self.reports = True

    @classmethod
    def from_argv(cls, argv: list[str]) -> Console:
        """The console an unparsable command line asks for (``-q``, ``-v``, ``--format json``).

        Example:
            >>> Console.from_argv(["inspect", "--format=json"]).json_mode
            True
        """
        pairs = zip(argv, argv[1:] + [""])
        json_mode = "--format=json" in argv or any(a == "--format" and b == "json" for a, b in pairs)
        return cls(quiet="-q" in argv or "--quiet" in argv, verbose="-v" in argv or "--verbose" in argv,
                   json=json_mode)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """A warning on stderr, shown even with ``--quiet``."""
        if self.reports:
            print(f"fxnorm: warning: {message}", file=sys.stderr, flush=True)

    def out(self, text: str = "") -> None:
        if self.reports:
            print(text, file=sys.stdout, flush=True)

    def json(self, obj: Any) -> None:
        if self.reports:
            print(json.dumps(obj, indent=2, default=str), file=sys.stdout, flush=True)

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    def fail(self, message: str, code: int, report: dict[str, Any] | None = None, hint: str = "",
             details: list[str] | None = None) -> int:
        """Print an error and return ``code``: ``fxnorm: error: message`` on stderr (then the
        ``details`` lines, then the ``hint``); in JSON mode also ``{"error", "exit"}`` on stdout, with
        ``details`` when there are some, added to the command's ``report`` when there is one.
        """
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            print("\n".join([f"fxnorm: error: {message}", *(details or []), *([hint] if hint else [])]),
                  file=sys.stderr, flush=True)
        if self.json_mode:
            extra = {"details": [d.strip() for d in details]} if details else {}
            try:
                self.json({**(report or {}), "error": message, **extra, "exit": code})
            except BrokenPipeError:
                return self.broken_pipe()
        return code

    def broken_pipe(self) -> int:
        """stdout's reader is gone: send what is left to /dev/null (no error at exit) and return 141."""
        if sys.stdout is sys.__stdout__ and sys.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE

    @contextlib.contextmanager
    def library(self) -> Iterator[None]:
        """Hold what library code prints on stderr, from Python or below it (torch's ShapeProp prints a
        traceback before it raises, torch.export logs whole graphs): shown after the block succeeds
        (unless ``--quiet``), dropped when it fails unless ``--verbose``."""
        held = io.StringIO()
        with tempfile.TemporaryFile(mode="w+b") as low, contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stderr(held))
            stack.enter_context(_fd_redirected(2, low.fileno()))
            try:
                yield
            except BaseException:
                stack.close()
                if self.verbose:
                    sys.stderr.write(_read_back(low) + held.getvalue())
                raise
            stack.close()
            text = _read_back(low) + held.getvalue()
            if text and not self.quiet:
                sys.stderr.write(text)


@contextlib.contextmanager
def _fd_redirected(fd: int, target: int) -> Iterator[None]:
    """Point file descriptor ``fd`` at ``target`` inside the block (nothing happens when ``fd`` is closed)."""
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    if sys.__stderr__ is not None:
        with contextlib.suppress(ValueError, OSError):
            sys.__stderr__.flush()
    os.dup2(target, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _read_back(file: Any) -> str:
    file.flush()
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")
