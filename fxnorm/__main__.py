"""``python -m fxnorm``: the same as the ``fxnorm`` console script (see :mod:`fxnorm.cli`).

Example:
    >>> import subprocess, sys
    >>> subprocess.run([sys.executable, "-m", "fxnorm", "--version"]).returncode   # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys

from .cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
