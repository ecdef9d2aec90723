"""Shared pytest set-up: put ``tests/`` on ``sys.path`` so test modules can ``import zoo`` and
``from devices import DEVICES``; keep torch to the CI's two cores."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402  (after the path set-up on purpose)

# CI runs on two slow cores; more intra-op threads than cores only adds contention.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (see :func:`helpers.one_thread`)."""
    from helpers import one_thread as single

    with single():
        yield
