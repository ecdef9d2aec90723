"""Where the ``fxnorm`` command writes: reports to stdout (a table, or one JSON object), logs and
progress bars to stderr (silenced by ``--quiet``); and its exit statuses.

Example:
    >>> Console(quiet=True).log("not shown")
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["Console", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

#: Exit statuses: success, failure (a one-line cause), bad arguments or unknown model.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Console:
    """stdout for reports, stderr for logs (silenced by --quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def out(self, text: str = "") -> None:
        print(text, file=sys.stdout, flush=True)

    def json(self, obj: Any) -> None:
        print(json.dumps(obj, indent=2, default=str), file=sys.stdout, flush=True)

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()
