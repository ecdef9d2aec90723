"""The ``fxnorm`` command line (``fxnorm.cli:main``), its model loading and its image data."""

from .main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, build_parser, main, relative_error

__all__ = ["main", "build_parser", "relative_error", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]
