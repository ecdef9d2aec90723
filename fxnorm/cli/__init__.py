"""The ``fxnorm`` command line (``fxnorm.cli:main``), its model loading and its image data."""

from .commands import relative_error
from .console import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .main import build_parser, main

__all__ = ["main", "build_parser", "relative_error", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]
