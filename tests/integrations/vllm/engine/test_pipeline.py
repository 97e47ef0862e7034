"""The plugin in a pipeline-parallel vLLM engine: SmolLM2-135M's 30 layers in two worker processes
(``pipeline_parallel_size=2``, ``mp`` executor, gloo), each stage holding its layers' LoRA slots.

vLLM 0.32's CPU build cannot run a later pipeline stage in eager mode, which LoRA turns on
(worker_classes.PipelineStageWorker says why and works around it). Answers are checked against
transformers + PEFT serving each request alone: greedy tokens, their log-probs and the teacher-forced
log-probs of the prompt within 1e-4 (fp32), with four adapters through two slots.
"""

import os
import random

import pytest
from engine_util import ENGINE_ARGS, ENGINE_ENV, adapter_path, assert_matches, model_folder
from parallel_util import bind_threads

MAX_TOKENS = 4
ADAPTERS = ("de", "code", "fr", "ru")
LORA_IDS = {name: i + 1 for i, name in enumerate(ADAPTERS)}
MIXES = (
    (),
    (("de", 1.0),),
    (("code", 1.0),),
    (("de", 0.7), ("code", -0.3)),
    (("fr", 0.5), ("ru", 0.5)),
    (("ru", 1.5),),
)


@pytest.fixture(scope="module")
def pp_llm():
    os.environ.update(ENGINE_ENV, VLLM_CPU_OMP_THREADS_BIND=bind_threads(2))
    from vllm import LLM

    args = dict(ENGINE_ARGS, max_loras=2, gpu_memory_utilization=0.05, kv_cache_memory_bytes=2**27)
    engine = LLM(
        model=str(model_folder()),
        **args,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        worker_cls="worker_classes.PipelineStageWorker",
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _request(mix, params):
    from vllm.lora.request import LoRARequest

    from dlplora_triton.integrations.vllm import mix_request

    if not mix:
        return None, params
    components = [(LoRARequest(n, LORA_IDS[n], adapter_path(n)), w) for n, w in mix]
    if len(mix) == 1 and mix[0][1] == 1.0:
        return components[0][0], params
    return mix_request(components, params)


def _generate(llm, rows, params):
    from vllm.inputs import TokensPrompt

    requests = [_request(mix, params) for _, mix in rows]
    return llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids, _ in rows],
        [p for _, p in requests],
        lora_request=[r for r, _ in requests],
        use_tqdm=False,
    )


def test_rows_of_one_batch_and_a_churn_equal_peft_alone(pp_llm, reference, prompts):
    from vllm import SamplingParams

    rng = random.Random(2)
    rows = [(prompts[i % len(prompts)], mix) for i, mix in enumerate(MIXES)]
    rows += [(rng.choice(prompts), rng.choice(MIXES)) for _ in range(10)]  # four adapters, two slots
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    for i, ((ids, mix), out) in enumerate(zip(rows, _generate(pp_llm, rows, params))):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
        assert_matches(tokens, logprobs, reference.greedy(ids, mix, MAX_TOKENS), f"row {i}: {mix}")


def test_teacher_forced_logprobs_equal_peft(pp_llm, reference, prompts):
    from vllm import SamplingParams

    rows = [(prompts[i % len(prompts)], mix) for i, mix in enumerate(MIXES)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for (ids, mix), out in zip(rows, _generate(pp_llm, rows, params)):
        got = [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:])]
        worst = max(abs(a - b) for a, b in zip(got, reference.prompt_logprobs(ids, mix)))
        assert worst < 1e-4, f"{mix}: prompt log-probs differ from PEFT by {worst:.2e}"


@pytest.mark.slow  # three workers (on 2 cores two share one), another SmolLM2 engine
def test_tensor_parallel_3_equals_peft_alone(reference, prompts):
    # SmolLM2's 9 query and 3 key/value heads split in three: each worker holds 3 and 1 of them.
    from vllm import LLM, SamplingParams

    cpus = sorted(os.sched_getaffinity(0))
    os.environ.update(
        ENGINE_ENV, VLLM_CPU_OMP_THREADS_BIND="|".join(str(cpus[i % len(cpus)]) for i in range(3))
    )
    args = dict(ENGINE_ARGS, max_loras=2, gpu_memory_utilization=0.05, kv_cache_memory_bytes=2**27)
    llm = LLM(model=str(model_folder()), **args, tensor_parallel_size=3, distributed_executor_backend="mp")
    try:
        rows = [(prompts[i % len(prompts)], mix) for i, mix in enumerate(MIXES)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        outputs = _generate(llm, rows, params)
    finally:
        llm.llm_engine.engine_core.shutdown()
    for (ids, mix), out in zip(rows, outputs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
        assert_matches(tokens, logprobs, reference.greedy(ids, mix, MAX_TOKENS), f"TP=3 {mix}")
