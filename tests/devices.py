"""Device parametrization shared by the tests.

Example:
    >>> import pytest
    >>> from devices import DEVICES
    >>> @pytest.mark.parametrize("device", DEVICES)
    ... def test_something(device): ...
"""

from __future__ import annotations

import pytest
import torch

__all__ = ["DEVICES", "CUDA"]

#: Marks for a test that needs a CUDA GPU: it is marked ``cuda`` and skips cleanly without one.
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

#: ``cpu`` always, ``cuda`` when a GPU is present (skipped otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
