"""Test configuration: GPU tests (marked ``gpu``) run only on a Hopper GPU; hypothesis runs
deterministically."""

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fgattn",
    derandomize=True,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fgattn")


def _have_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9


def pytest_collection_modifyitems(config, items):
    if _have_hopper():
        return
    skip = pytest.mark.skip(reason="needs a Hopper GPU (compute capability 9.x)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
