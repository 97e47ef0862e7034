"""A real vLLM engine (``LLM``, vLLM's CPU build) with the plugin, against transformers + PEFT.

One engine for the module: SmolLM2-135M in fp32 with the six committed adapters and ``max_loras=4``, so
that bursts and churn must share four slots. Every answer is checked against the same request served
alone by PEFT (greedy tokens, and their log-probs within 1e-4).
"""

import os
import random

import pytest
from engine_util import (
    ADAPTERS,
    ENGINE_ARGS,
    ENGINE_ENV,
    adapter_path,
    assert_matches,
    model_folder,
)

MAX_TOKENS = 6
LORA_IDS = {name: i + 1 for i, name in enumerate(ADAPTERS)}
MIXES = (
    (("de", 0.7), ("code", 0.3)),
    (("de", 1.0), ("code", -0.5)),
    (("fr", 0.5), ("ru", 0.25), ("zh", 0.25)),
    (("ja", 0.6), ("zh", 0.4)),
    (("code", 0.9), ("fr", 0.1)),
    (("ru", 2.0),),
)


@pytest.fixture(scope="module")
def llm():
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    engine = LLM(model=str(model_folder()), **ENGINE_ARGS)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _request(mix):
    """``(LoRARequest | None, SamplingParams)`` of a row: base (``()``), one adapter, or a mix."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from dlplora_triton.integrations.vllm import mix_request

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    if not mix:
        return None, params
    if len(mix) == 1 and mix[0][1] == 1.0:
        ((name, _),) = mix
        return LoRARequest(name, LORA_IDS[name], adapter_path(name)), params
    components = [(LoRARequest(n, LORA_IDS[n], adapter_path(n)), w) for n, w in mix]
    return mix_request(components, params)


def generate(llm, rows):
    """Serve ``[(prompt ids, mix), ...]`` as one batch: ``[(tokens, log-probs), ...]``."""
    from vllm.inputs import TokensPrompt

    requests = [_request(mix) for _, mix in rows]
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids, _ in rows],
        [params for _, params in requests],
        lora_request=[lora for lora, _ in requests],
        use_tqdm=False,
    )
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        results.append((tokens, [step[t].logprob for step, t in zip(completion.logprobs, tokens)]))
    return results


def test_one_batch_of_plain_adapters_mixes_and_base_equals_peft(llm, reference, prompts):
    # Eight rows needing all six adapters at once with four slots: the scheduler runs them in turns.
    rows = [
        (prompts[0], ()),
        (prompts[0], (("de", 1.0),)),
        (prompts[1], (("code", 1.0),)),
        (prompts[0], MIXES[0]),
        (prompts[1], MIXES[1]),  # a negative weight
        (prompts[2], MIXES[2]),
        (prompts[4], MIXES[3]),
        (prompts[3], MIXES[5]),
    ]
    for (ids, mix), (tokens, logprobs) in zip(rows, generate(llm, rows)):
        assert_matches(tokens, logprobs, reference.greedy(ids, mix, MAX_TOKENS), f"{mix or 'base'}")


def test_churn_of_200_requests_with_four_slots(llm, reference, prompts):
    # Seeded: batches of 1..10 rows over the six adapters, six mixes and the base model, repeats
    # included, so vLLM's LRU evicts components of mixes that come back later.
    rng = random.Random(19)
    models = [(), *[((n, 1.0),) for n in ADAPTERS], *MIXES]
    served = 0
    while served < 200:
        rows = [(rng.choice(prompts), rng.choice(models)) for _ in range(rng.randint(1, 10))]
        for (ids, mix), (tokens, logprobs) in zip(rows, generate(llm, rows)):
            assert_matches(
                tokens, logprobs, reference.greedy(ids, mix, MAX_TOKENS), f"request {served}: {mix}"
            )
            served += 1


def test_32_weightings_of_three_adapters_share_their_slots(llm, reference, prompts):
    rng = random.Random(32)
    rows = []
    for i in range(32):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        rows.append(
            (prompts[i % 3], (("de", round(a, 3)), ("code", round(b, 3)), ("fr", round(1 - a - b, 3))))
        )
    for (ids, mix), (tokens, logprobs) in zip(rows, generate(llm, rows)):
        assert_matches(tokens, logprobs, reference.greedy(ids, mix, MAX_TOKENS), f"{mix}")


def test_an_empty_batch_is_served(llm):
    assert generate(llm, []) == []


def _broken_adapters(root):
    """A truncated copy of ``de`` and one whose config claims rank 32 (above max_lora_rank 16)."""
    import json
    import shutil

    truncated, big = root / "truncated", root / "bigrank"
    shutil.copytree(adapter_path("de"), truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    shutil.copytree(adapter_path("de"), big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps(dict(config, r=32, rank_pattern={})))
    return str(truncated), str(big)


def test_bad_mixes_fail_alone_and_the_engine_goes_on(llm, reference, prompts, tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from dlplora_triton.integrations.vllm import mix_request

    truncated, big = _broken_adapters(tmp_path)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)

    def lora(name, path=None, lora_id=None):
        return LoRARequest(name, lora_id or LORA_IDS[name], path or adapter_path(name))

    bad = {
        "five components with four slots": mix_request([(lora(n), 0.2) for n in ADAPTERS[:5]], params),
        "a missing adapter directory": mix_request(
            [(lora("de"), 0.5), (lora("x", "/no/such", 90), 0.5)], params
        ),
        "a truncated component": mix_request([(lora("de"), 0.5), (lora("t", truncated, 91), 0.5)], params),
        "a rank above max_lora_rank": mix_request([(lora("de"), 0.5), (lora("b", big, 92), 0.5)], params),
    }
    # A mix argument written by hand (no signature; another adapter's path under de's id): refused
    # before any path is read.
    anchor, signed = mix_request([(lora("de"), 0.5), (lora("code"), 0.5)], params)
    forged = params.clone()
    forged.extra_args = {"dlplora_mix": signed.extra_args["dlplora_mix"].replace("/code", "/fr")}
    bad["an unsigned mix"] = (anchor, forged)
    good = [(prompts[0], MIXES[0]), (prompts[1], (("code", 1.0),))]
    requests = [_request(mix) for _, mix in good] + list(bad.values())
    ids = [ids for ids, _ in good] + [prompts[2]] * len(bad)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=i) for i in ids],
        [p for _, p in requests],
        lora_request=[r for r, _ in requests],
        use_tqdm=False,
    )
    for what, out in zip(bad, outputs[len(good) :]):
        assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids, what
    for (prompt, mix), out in zip(good, outputs[: len(good)]):
        completion = out.outputs[0]
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        assert_matches(completion.token_ids, logprobs, reference.greedy(prompt, mix, MAX_TOKENS), f"{mix}")
    rows = [(prompts[3], MIXES[2])]  # and the next batch is served as if nothing had happened
    for (prompt, mix), got in zip(rows, generate(llm, rows)):
        assert_matches(*got, reference.greedy(prompt, mix, MAX_TOKENS), "after the bad requests")
