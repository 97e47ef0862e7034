"""Test set-up: without CUDA the Triton kernels run in the interpreter, which must be switched on before
triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="GPU test: no CUDA device"))
        # On a CUDA machine the kernels compile, so Triton cannot run on the CPU tensors of these
        # modules; run them apart with TRITON_INTERPRET=1 -m "not gpu" (tests/ops/test_gpu.py covers CUDA).
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))
