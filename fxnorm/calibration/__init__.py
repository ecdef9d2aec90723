"""Resetting and recalibrating the running statistics of normalization layers on the user's own
model: the public entry points (``recalibration``), the session's hooks (``session``), the mode that
catches the norm calls (``interception``), what is gathered (``observers``, the CPU ``fast_path``,
the exact float64 ``moments``), what finishing writes (``writing``), ``selection``, ``batches`` and
the ``report``."""
