"""torch.compile(model, fullgraph=True) of a transformers Llama with attached adapters: no graph break,
equal to eager, and a new routing of the same batch shape compiles nothing new (docs/plan.md says what
does recompile)."""

import copy

import peft_helpers
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dlplora_triton as dlp

TARGETS = (["q_proj", "v_proj", "down_proj"], ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = peft_helpers.make_model("llama")
    tmp = tmp_path_factory.mktemp("compile")
    paths = {
        name: peft_helpers.save_adapter(
            base, tmp / name, seed, scale=0.2, r=r, lora_alpha=8, target_modules=t
        )
        for name, seed, r, t in (("a", 1, 4, TARGETS[0]), ("b", 2, 8, TARGETS[1]))
    }
    return base, paths


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


ROUTINGS = [
    [[("a", 0.7), ("b", 0.3)], [("b", 1.0)], []],
    [[("b", -0.4), ("a", 1.2)], [], [("a", 1.0), ("b", 0.5)]],  # same shape [3, P=2], a new mix
    [[("a", 0.5)], [("a", 1.0)], [("a", 2.0), ("b", 0.1)]],  # adapter b unused in most rows, P=2
]


def _setup(llama, backend):
    base, paths = llama
    model = copy.deepcopy(base)
    lora = dlp.attach(model, paths)
    ids = torch.randint(3, peft_helpers.VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return base, model, lora, ids, counter, torch.compile(model, fullgraph=True, backend=counter)


def test_compiled_model_equals_eager_and_new_routings_do_not_recompile(llama):
    base, model, lora, ids, counter, compiled = _setup(llama, "aot_eager")
    frames = []
    for selection in ROUTINGS:
        lora.select(selection)
        got = _logits(compiled, ids)  # compiled first: the plan is built inside the graph
        again = _logits(compiled, ids)  # then read from the plan source's cache
        want = _logits(model, ids)
        assert (got - want).abs().max() < 1e-5 and (again - want).abs().max() < 1e-5
        assert (want - _logits(base, ids)).abs().max() > 1e-2, "the adapters must change the logits"
        frames.append(counter.frame_count)
    # One graph for the first call of a selection (plan built in the graph), one for later calls
    # (plan read from the plan source's cache); new routings of the same shape reuse both.
    assert frames[0] <= 2 and frames[-1] == frames[0], frames
    lora.select([[("a", 1.0)], [("b", 1.0)], []])  # P = 1: a new graph
    assert (_logits(compiled, ids) - _logits(model, ids)).abs().max() < 1e-5
    assert counter.frame_count > frames[-1]
    lora.detach()


def test_inductor_compiled_model_equals_eager(llama):
    """Inductor compiles are slow on CPU: one graph (the plan read from the cache), two routings."""
    base, model, lora, ids, counter, compiled = _setup(llama, "inductor")
    for selection in ROUTINGS[:2]:
        lora.select(selection)
        want = _logits(model, ids)  # eager first: the plan source caches the plan
        assert (_logits(compiled, ids) - want).abs().max() < 1e-5
    assert counter.frame_count == 1
    lora.detach()
