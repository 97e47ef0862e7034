"""pytest-benchmark view of the kernel suite (`make bench`): one test per (shape, provider)."""

import pytest
import torch
from bench_kernels import PROVIDERS, LayerCase, suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = suite(DEVICE, quick=True)


@pytest.fixture(
    scope="module",
    params=SHAPES,
    ids=lambda s: f"{s.name}-{s.popularity}-T{s.seqs * s.tokens_per_seq}-P{s.P}",
)
def layer_case(request):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return LayerCase(request.param, DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer(benchmark, layer_case, provider):
    fn = getattr(layer_case, provider)()
    fn()  # warm-up, compilation included
    if DEVICE == "cuda":

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)
