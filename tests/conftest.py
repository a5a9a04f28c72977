"""Test set-up. Without a GPU, Triton kernels run on CPU tensors through the interpreter, which
must be switched on before triton is first imported."""
import os

os.environ.setdefault("PTQRT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ptqrt"))
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_backend():
    """Each test starts from backend 'auto' and a fixed seed, whatever the previous test set."""
    import torch

    import ptqrt.ops as ops

    ops.set_backend("auto")
    torch.manual_seed(0)
    yield
    ops.set_backend("auto")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
