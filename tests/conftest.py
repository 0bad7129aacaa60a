"""Test-suite setup: Triton's CPU interpreter where no GPU is present, and Hypothesis profiles."""
import os

import torch

# Must happen before any @triton.jit function is defined (dmd2.kernels.triton is imported lazily, later).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# one thread: the test networks are tiny (more threads only add overhead) and results stay reproducible
torch.set_num_threads(int(os.environ.get("DMD2_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
