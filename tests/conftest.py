"""Test configuration: a fresh random seed for every test, reported on failure.

Inputs are drawn fresh each run (never zeros, never a fixed seed). A failing test's report shows
its seed under "random seed"; rerun with ``VOCABSEM_TEST_SEED=<seed>`` to reproduce it.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

import pytest
import torch

# ``from helpers import ...`` works however pytest is invoked (and whether or not tests/ is a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# torch.compile's on-disk caches can outlive a change of a custom op's schema: compile afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vocabsem-inductor-"))


@pytest.fixture(autouse=True)
def fresh_seed(request):
    fixed = os.environ.get("VOCABSEM_TEST_SEED")
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    request.node.vocabsem_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "vocabsem_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"VOCABSEM_TEST_SEED={seed}"))
