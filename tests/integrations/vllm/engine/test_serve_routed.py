"""``dlplora serve``: vLLM's OpenAI server routing ``"model": "auto"`` with the DLP-LoRA router.

One routed server for the module, started by the ``dlplora serve`` command (which replaces itself with
vLLM's server: the fixture stops it by that PID). The router is trained here on the package's text set
less the held-out texts, for the six committed adapters. Routed requests are checked against the same
mix named directly and against transformers + PEFT; the held-out texts' routes through the server
against ``Router.route`` in this process.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_util import (
    ADAPTER_DIR,
    ADAPTERS,
    ENGINE_ARGS,
    Server,
    assert_matches,
    model_folder,
    route_of_header,
    serve_for_module,
)

MAX_TOKENS = 6
P, TOP_K = 0.8, 3


@pytest.fixture(scope="module")
def held_out():
    from dlplora_triton.demo.tasks import load_texts, task_split

    texts, tasks = load_texts()
    _, held = task_split(texts, tasks)
    return held


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, held_out):
    from dlplora_triton.demo.tasks import load_texts
    from dlplora_triton.routing import Router

    texts, tasks = load_texts()
    held = {t for ts in held_out.values() for t in ts}
    train = [(x, t) for x, t in zip(texts, tasks) if x not in held]
    router = Router.train([x for x, _ in train], [t for _, t in train], adapters=list(ADAPTERS), seed=0)
    return router.save(tmp_path_factory.mktemp("router") / "router")


@pytest.fixture(scope="module")
def router(router_dir):
    from dlplora_triton.routing import Router

    return Router.load(router_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, router_dir, request):
    root = tmp_path_factory.mktemp("routed")
    dlplora = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    args = ["--adapters", str(ADAPTER_DIR), "--router", str(router_dir), "--p", str(P), "--top-k", str(TOP_K)]
    args += ["--model", str(model_folder()), "--served-model-name", "smollm2", "--max-loras", "4"]
    args += ["--dtype", "float32", "--max-model-len", str(ENGINE_ARGS["max_model_len"])]
    args += ["--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"])]
    yield from serve_for_module(request, root / "server.log", args, command=dlplora)


def _routed(client, prompt: str, max_tokens=MAX_TOKENS, **extra):
    raw = client.completions.with_raw_response.create(
        model="auto",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra},
    )
    out = raw.parse()
    choice = out.choices[0]
    return raw.headers["x-dlplora-route"], out.model, choice


def test_routed_request_equals_the_direct_mix_and_peft(client, reference, held_out):
    for text in (held_out["de"][0], held_out["code"][1], held_out["ja"][2]):
        header, model, choice = _routed(client, text)
        mix = route_of_header(header)
        assert mix, f"{text[:40]!r} was not routed to an adapter"
        direct = client.completions.create(
            model=model,
            prompt=choice.prompt_token_ids,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            logprobs=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        ).choices[0]
        routed = (list(choice.token_ids), list(choice.logprobs.token_logprobs))
        assert_matches(
            *routed, (list(direct.token_ids), list(direct.logprobs.token_logprobs)), f"{model}", 1e-5
        )
        assert_matches(
            *routed, reference.greedy(choice.prompt_token_ids, mix, MAX_TOKENS), f"{model} vs PEFT"
        )


def test_held_out_texts_route_as_in_process(client, router, held_out):
    for task in ADAPTERS:
        for text in held_out[task][:4]:
            header, _, _ = _routed(client, text, max_tokens=1)
            (expected,) = router.route([text], p=P, top_k=TOP_K)
            assert route_of_header(header) == tuple(expected), f"{task}: {text[:50]!r}"


def test_off_topic_prompts_reach_the_base_model(client):
    for prompt in ("hello", "hello, how are you?", "What is the capital of France?"):
        header, model, _ = _routed(client, prompt, max_tokens=1)
        assert (header, model) == ("base", "smollm2"), prompt


def test_chat_routes_the_last_user_message_and_streams(client, held_out):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": held_out["fr"][0]},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
    )
    route = raw.headers["x-dlplora-route"]
    assert "fr" in dict(route_of_header(route)), route
    whole = raw.parse().choices[0].message.content
    stream = client.chat.completions.create(
        model="auto",
        messages=messages,
        max_tokens=8,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_per_request_overrides(client, held_out):
    text = held_out["de"][3]
    header, _, _ = _routed(client, text, max_tokens=1, routing={"adapters": ["fr", "code"]})
    assert set(dict(route_of_header(header))) <= {"fr", "code"}, header
    header, _, _ = _routed(client, text, max_tokens=1, routing={"p": 1.0, "top_k": 1})
    assert len(route_of_header(header)) == 1, header
    header, _, _ = _routed(client, text, max_tokens=1, routing={"base_threshold": 1e-9})
    assert header == "base"


BAD = [
    ("/v1/completions", {"prompt": "   "}, "empty"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "one prompt given as text"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt given as text"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ]
        },
        "has none",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, "no"),
    ("/v1/completions", {"prompt": "Hallo", "routing": {"p": 0}}, "routing.p"),
    ("/v1/completions", {"prompt": "Hallo", "routing": {"top_k": 0}}, "routing.top_k"),
    ("/v1/completions", {"prompt": "Hallo", "routing": {"adapters": ["nosuch"]}}, "nosuch"),
    ("/v1/completions", {"prompt": "Hallo", "routing": {"q": 1}}, "unknown fields"),
    ("/v1/completions", {"messages": [{"role": "user", "content": "Hallo"}]}, "goes to /v1/chat/completions"),
    ("/v1/chat/completions", {"prompt": "Hallo"}, "goes to /v1/completions"),
    ("/v1/chat/completions", {"messages": "hi"}, "must be a list"),
]


@pytest.mark.parametrize("path, body, words", BAD, ids=[w for _, _, w in BAD])
def test_unreadable_requests_are_4xx_and_the_server_stays_up(server, client, held_out, path, body, words):
    code, answer = server.post(path, {"model": "auto", "max_tokens": 2, **body})
    assert code == 400, answer
    assert words in answer["error"]["message"], answer
    assert server.alive()
    header, _, choice = _routed(client, held_out["de"][0], max_tokens=2)
    assert header != "base" and len(choice.token_ids) == 2


def test_a_100k_character_prompt_is_routed_on_its_start_and_refused_by_length(server, held_out):
    code, answer = server.post(
        "/v1/completions", {"model": "auto", "prompt": held_out["de"][0] * 2000, "max_tokens": 2}
    )
    assert 400 <= code < 500, answer  # vLLM's own refusal: longer than --max-model-len
    assert server.alive()


def test_routed_requests_batch_and_are_counted(server, client, held_out):
    texts = [held_out[t][5] for t in ADAPTERS] + ["hello", "What is the capital of France?"]
    with server.peak_running() as peak, ThreadPoolExecutor(len(texts)) as pool:
        list(pool.map(lambda t: _routed(client, t, max_tokens=24), texts))
    assert peak[0] > 1, "routed requests with different mixes never ran in one step"
    metrics = server.metrics()
    assert 'dlplora_routes_total{adapter="base"}' in metrics
    assert "dlplora_route_seconds_bucket" in metrics and "dlplora_route_cpu_seconds_bucket" in metrics


@pytest.mark.parametrize(
    "model, hint", [("nosuch", ""), ("Auto", "did you mean 'auto'"), ("DE", "did you mean 'de'")]
)
def test_an_unknown_model_is_told_what_is_served(server, model, hint):
    code, answer = server.post("/v1/completions", {"model": model, "prompt": "Hallo", "max_tokens": 2})
    message = answer["error"]["message"]
    assert code == 404 and hint in message, answer
    for words in ("'smollm2'", "'auto'", "de, ", "mix:"):
        assert words in message, answer


def test_models_list_auto_and_no_paths(server):
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
        text = r.read().decode()
    models = {entry["id"]: entry for entry in json.loads(text)["data"]}
    assert {"smollm2", "auto", *ADAPTERS} <= set(models)
    assert models["auto"]["owned_by"] == "dlplora"
    assert str(ADAPTER_DIR) not in text and str(model_folder()) not in text


def test_base_model_answers_carry_no_path(tmp_path_factory, router_dir):
    # Started as a user would: no --served-model-name and, on CPU, dlplora serve's own defaults.
    root = tmp_path_factory.mktemp("routed_names")
    dlplora = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    args = ["--adapters", str(ADAPTER_DIR), "--router", str(router_dir), "--model", str(model_folder())]
    server, passed = Server(args, root / "server.log", command=dlplora), False
    try:
        for model in ("auto", str(model_folder())):
            code, answer = server.post(
                "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 2}
            )
            assert code == 200 and answer["model"] == model_folder().name, answer
            assert str(model_folder()) not in json.dumps(answer)
        log = server.log_path.read_text()
        assert "no GPU here" in log and "--gpu-memory-utilization" in log
        assert "vllm.entrypoints.openai.api_server" not in log  # vLLM's deprecated entry point
        passed = True
    finally:
        server.stop(keep_log=not passed)
        if not passed:
            print(f"\nserver log kept: {server.log_path}")
