"""What the ``fxnorm`` command does before anything heavy is imported.

Importing fxnorm imports torch, which takes a second or more: a Ctrl-C in that second arrives before
the command line's own handler exists. :func:`quiet_interrupts_of_the_command_line` makes such an
interrupt end the ``fxnorm`` process like every other one (one line on stderr, exit 130, see
:mod:`fxnorm.cli.console`) instead of a traceback through torch's import machinery. In any other
process (``import fxnorm`` in a script or a notebook) it does nothing. Only the standard library is
used here, so that it runs first.

Example:
    >>> running_the_command_line()               # this process is not the ``fxnorm`` command...
    False
    >>> quiet_interrupts_of_the_command_line()   # ...so nothing is changed
    False
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["quiet_interrupts_of_the_command_line", "running_the_command_line"]

#: The exit status of an interrupted ``fxnorm`` (128 + SIGINT), as :data:`fxnorm.cli.console.EXIT_INTERRUPTED`.
_INTERRUPTED = 130


def running_the_command_line() -> bool:
    """Whether this process is the ``fxnorm`` console script or ``python -m fxnorm``."""
    if os.path.basename(sys.argv[0]) in ("fxnorm", "fxnorm.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "fxnorm" for a, b in zip(argv, argv[1:]))


def _quiet_hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        try:
            sys.stderr.write("fxnorm: error: interrupted; nothing was saved\n")
            sys.stderr.flush()
        finally:
            os._exit(_INTERRUPTED)  # nothing was started that needs cleaning up
    sys.__excepthook__(kind, value, tb)


def quiet_interrupts_of_the_command_line() -> bool:
    """In the ``fxnorm`` command, turn an uncaught Ctrl-C into one line and exit 130; whether it did."""
    if not running_the_command_line():
        return False
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _quiet_hook
    return True
