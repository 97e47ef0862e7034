"""The plugin in a tensor-parallel vLLM engine: two worker processes (``--distributed-executor-backend
mp``, gloo), each holding half of every layer, started by ``dlplora serve --tensor-parallel-size 2``.

The model is parallel_util's small Llama (4 query, 2 key/value heads: SmolLM2's 9 and 3 do not split
in two), with four adapters and two slots. Every answer is checked against transformers + PEFT
serving the request alone (greedy tokens, log-probs within 1e-4 in fp32), and the teacher-forced
log-probs against PEFT (and, marked slow, a one-worker engine). ``a_flipped`` is ``a`` with the second
shard's half of each layer negated, so a mix of the two differs in sign per shard: a shard that applied
another row's weights, or a component twice, gives another answer. Marked slow (``make test-slow``):
two data-parallel replicas, and a worker without the plugin stopping the engine before it serves.
"""

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_util import Server, assert_matches, route_of_header, serve_for_module
from parallel_util import TINY_ADAPTERS, TINY_RANK, TinyReference, bind_threads, build_tiny_llama

MAX_TOKENS = 5
SLOTS = 2
PROMPTS = (
    "the quick brown fox",
    "def fibonacci(n):",
    "Wie geht es dir heute?",
    "Bonjour, je voudrais",
)
MIXES = (
    (),
    (("a", 1.0),),
    (("b", 1.0),),
    (("a", 0.7), ("b", -0.3)),  # a negative weight
    (("a", 0.5), ("a_flipped", 0.5)),  # a on shard 0, nothing on shard 1
    (("a", 1.0), ("a_flipped", -0.5)),  # 0.5 a on shard 0, 1.5 a on shard 1
    (("c", 0.6), ("b", 0.4)),
    (("a_flipped", 1.5),),
)
# The router's tasks: the package's texts of three tasks, one adapter each.
ROUTED_TASKS = {"de": "a", "code": "b", "fr": "c"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    return TinyReference(*tiny)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny[0]))


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    from dlplora_triton.demo.tasks import load_texts
    from dlplora_triton.routing import Router

    texts, tasks = load_texts()
    pairs = [(x, ROUTED_TASKS[t]) for x, t in zip(texts, tasks) if t in ROUTED_TASKS]
    router = Router.train([x for x, _ in pairs], [t for _, t in pairs], adapters=["a", "b", "c"], seed=0)
    return router.save(tmp_path_factory.mktemp("tiny_router") / "router")


def engine_flags(model_dir: Path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--max-loras",
        str(SLOTS),
        "--max-lora-rank",
        str(TINY_RANK),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--gpu-memory-utilization",
        "0.05",
        "--kv-cache-memory-bytes",
        str(2**27),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny, router_dir, request):
    model_dir, adapters = tiny
    dlplora = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    args = ["--adapters", str(adapters["a"].parent), "--router", str(router_dir), "--top-k", str(SLOTS)]
    args += [*engine_flags(model_dir), "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    log = tmp_path_factory.mktemp("tp2") / "server.log"
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind_threads(2), "VLLM_LOGGING_LEVEL": "INFO"}
    env["DLPLORA_METRICS_DIR"] = str(log.parent)  # the workers' adapter counts (one file per process)
    yield from serve_for_module(request, log, args, command=dlplora, env=env)


def name_of(mix) -> str:
    if not mix:
        return "tiny"
    if len(mix) == 1 and mix[0][1] == 1.0:
        return mix[0][0]
    return "mix:" + ",".join(f"{n}={w!r}" for n, w in mix)


def complete(server, ids, mix, max_tokens=MAX_TOKENS, **extra) -> dict:
    code, answer = server.post(
        "/v1/completions",
        {
            "model": name_of(mix),
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": 0,
            "return_token_ids": True,
            "ignore_eos": True,
            **extra,
        },
    )
    assert code == 200, answer
    return answer["choices"][0]


def tokens_and_logprobs(choice) -> tuple[list[int], list[float]]:
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def test_the_plugin_runs_in_both_workers(server):
    log = server.log_path.read_text()
    assert "dlplora: the plugin runs in all 2 vLLM workers" in log
    assert "tensor_parallel_size=2" in log


def test_concurrent_rows_with_different_mixes_and_none_equal_peft_alone(server, tokenizer, tiny_reference):
    # Eight concurrent requests needing all four adapters through two slots: vLLM batches what fits.
    rows = [(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"], mix) for i, mix in enumerate(MIXES)]
    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(lambda row: complete(server, *row), rows))
    for (ids, mix), choice in zip(rows, answers):
        assert_matches(*tokens_and_logprobs(choice), tiny_reference.greedy(ids, mix, MAX_TOKENS), f"{mix}")


def test_churn_with_fewer_slots_than_adapters(server, tokenizer, tiny_reference):
    rng = random.Random(29)
    rows = [(tokenizer(rng.choice(PROMPTS))["input_ids"], rng.choice(MIXES)) for _ in range(24)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda row: complete(server, *row, max_tokens=3), rows))
    for i, ((ids, mix), choice) in enumerate(zip(rows, answers)):
        assert_matches(
            *tokens_and_logprobs(choice), tiny_reference.greedy(ids, mix, 3), f"request {i}: {mix}"
        )


def routed(server, text: str, max_tokens=MAX_TOKENS) -> tuple[str, dict]:
    """``(x-dlplora-route header, first choice)`` of a greedy ``"model": "auto"`` completion."""
    import json
    import urllib.request

    body = {"model": "auto", "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0}
    body.update(return_token_ids=True, ignore_eos=True)
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        return r.headers["x-dlplora-route"], json.loads(r.read())["choices"][0]


def test_routed_auto_requests_equal_peft_alone(server, tokenizer, tiny_reference):
    from dlplora_triton.demo.tasks import load_texts

    texts, tasks = load_texts()
    for task in ROUTED_TASKS:
        text = next(x for x, t in zip(texts, tasks) if t == task)
        header, choice = routed(server, text)
        mix = route_of_header(header)
        assert mix, f"{task}: {text[:40]!r} was not routed to an adapter"
        ids = tokenizer(text)["input_ids"]
        assert list(choice["prompt_token_ids"]) == ids
        assert_matches(
            *tokens_and_logprobs(choice), tiny_reference.greedy(ids, mix, MAX_TOKENS), f"auto {mix}"
        )


def _prompt_logprobs(choice, ids) -> list[float]:
    """The log-probs of ``ids[1:]`` in a completion's ``prompt_logprobs`` (vLLM's extra field)."""
    steps = choice["prompt_logprobs"][1:]
    return [step[str(token)]["logprob"] for step, token in zip(steps, ids[1:])]


def test_adapter_counts_come_from_one_worker(server):
    # Both workers load and activate every adapter (each its shard); /metrics counts each event once.
    import json

    counted = [json.loads(p.read_text()) for p in server.log_path.parent.glob("adapters-*.json")]
    counted = [c for c in counted if any(c.values())]
    assert len(counted) == 1, counted
    assert counted[0]["loads"] >= len(TINY_ADAPTERS) and counted[0]["activations"] >= len(TINY_ADAPTERS)
    assert f"dlplora_adapter_loads_total {float(counted[0]['loads'])}" in server.metrics()


def teacher_forced_rows(server, tokenizer) -> list[tuple[list[int], tuple, list[float]]]:
    """``(prompt ids, mix, the TP=2 server's log-probs of ids[1:])`` for each of ``MIXES``."""
    rows = []
    for i, mix in enumerate(MIXES):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)] * 3)["input_ids"]
        choice = complete(server, ids, mix, max_tokens=1, prompt_logprobs=0)
        rows.append((ids, mix, _prompt_logprobs(choice, ids)))
    return rows


def test_teacher_forced_logprobs_equal_peft(server, tokenizer, tiny_reference):
    for ids, mix, got in teacher_forced_rows(server, tokenizer):
        worst = max(abs(a - b) for a, b in zip(got, tiny_reference.prompt_logprobs(ids, mix)))
        assert worst < 1e-4, f"{mix}: TP=2 vs PEFT differ by {worst:.2e}"


@pytest.mark.slow  # a second engine; make test checks the same log-probs against PEFT above
def test_teacher_forced_logprobs_equal_one_worker(server, tiny, tokenizer):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from dlplora_triton.integrations.vllm import mix_request

    model_dir, adapters = tiny
    rows = teacher_forced_rows(server, tokenizer)
    lora_ids = {name: i + 1 for i, name in enumerate(TINY_ADAPTERS)}
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    requests = []
    for _, mix, _ in rows:
        components = [(LoRARequest(n, lora_ids[n], str(adapters[n])), w) for n, w in mix]
        if not mix:
            requests.append((None, params))
        elif len(mix) == 1 and mix[0][1] == 1.0:
            requests.append((components[0][0], params))
        else:
            requests.append(mix_request(components, params))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind_threads(1)
    llm = LLM(**_offline_args(model_dir))
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _, _ in rows],
            [p for _, p in requests],
            lora_request=[r for r, _ in requests],
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    for (ids, mix, got), out in zip(rows, outputs):
        tp1 = [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
        worst = max(abs(a - b) for a, b in zip(got, tp1))
        assert worst < 1e-4, f"{mix}: TP=2 vs TP=1 differ by {worst:.2e}"


def _offline_args(model_dir) -> dict:
    """The offline engine's arguments for the tiny model (one worker; the caller adds parallelism)."""
    return {
        "model": str(model_dir),
        "enable_lora": True,
        "max_loras": SLOTS,
        "max_lora_rank": TINY_RANK,
        "dtype": "float32",
        "max_model_len": 256,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.05,
        "kv_cache_memory_bytes": 2**27,
    }


@pytest.mark.slow  # another engine start; make test checks the same refusal in test_worker_check.py
def test_a_worker_without_the_plugin_stops_the_engine(tiny, capfd):
    # Rank 1 runs vLLM's own punica wrapper (worker_classes.py): the engine must not start.
    from vllm import LLM

    model_dir, _ = tiny
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind_threads(2)
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        LLM(
            **_offline_args(model_dir),
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            worker_cls="worker_classes.RankOneWithoutPlugin",
        )
    err = capfd.readouterr().err
    assert "dlplora: 1 of 2 vLLM workers do not run the plugin" in err, err[-3000:]
    assert "rank 1 (pid" in err and "PunicaWrapperCPU" in err


@pytest.mark.slow  # another server (two engine cores)
def test_data_parallel_replicas_equal_peft_alone(
    tmp_path_factory, tiny, router_dir, tokenizer, tiny_reference
):
    # --data-parallel-size 2: two engine cores with one worker each, behind one API server that
    # balances requests between them; both must serve mixes as PEFT does.
    model_dir, adapters = tiny
    dlplora = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    args = ["--adapters", str(adapters["a"].parent), "--router", str(router_dir), "--top-k", str(SLOTS)]
    args += [*engine_flags(model_dir), "--data-parallel-size", "2"]
    log = tmp_path_factory.mktemp("dp2") / "server.log"
    dp = Server(args, log, command=dlplora, env={"VLLM_CPU_OMP_THREADS_BIND": bind_threads(2)})
    passed = False
    try:
        rows = [(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"], mix) for i, mix in enumerate(MIXES * 2)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda row: complete(dp, *row), rows))
        for (ids, mix), choice in zip(rows, answers):
            assert_matches(
                *tokens_and_logprobs(choice), tiny_reference.greedy(ids, mix, MAX_TOKENS), f"{mix}"
            )
        served = {}
        for line in dp.metrics().splitlines():
            if line.startswith("vllm:request_success_total{"):
                engine = line.split('engine="')[1].split('"')[0]
                served[engine] = served.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
        assert served.get("0", 0) > 0 and served.get("1", 0) > 0, f"requests per engine core: {served}"
        passed = True
    finally:
        dp.stop(keep_log=not passed)
        if not passed:
            print(f"\nserver log kept: {log}")
