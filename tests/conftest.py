"""Shared test set-up.

Triton kernels run on CPU tensors under the interpreter when no GPU is present; the
variable must be set before triton is first imported, so it is set here, at collection.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.path.exists("/dev/nvidiactl") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._device  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these)")
    for item in items:
        if item.get_closest_marker("gpu"):  # a marker, not a keyword: a folder may be named gpu
            item.add_marker(skip)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """New float tensors from torch.empty/empty_like start as NaN: an unwritten element shows."""
    # torch.device contexts cache the constructors they redirect on first use: cache the real
    # ones first, or a context first used under this patch keeps the wrappers for the whole
    # session, and `with torch.device("meta")` no longer reaches torch.empty in later tests.
    torch.utils._device._device_constructors()

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        return allocate_nan

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run here: CPU tensors under the interpreter, else the GPU.
    Tensors the test creates land there."""
    from deit_fast.kernels import triton_runnable

    device = "cpu" if triton_runnable("cpu")[0] else "cuda"
    with torch.device(device):
        yield device
