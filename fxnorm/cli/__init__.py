"""The ``fxnorm`` command line (``fxnorm.cli:main``), its model loading and its image data."""

from .console import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .main import build_parser, main
from ..graph.runtime import relative_error

__all__ = ["main", "build_parser", "relative_error", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED",
           "EXIT_BROKEN_PIPE"]
