"""The attacker's suite: vLLM's OpenAI server with the plugin and the routing middleware, under hostile
traffic (docs/vllm.md, "Security").

One server for the module, started with ``--api-key`` and the routing middleware (``"model": "auto"``,
``mix:`` names, the adapter directory), with runtime LoRA updating on so that loads can race unloads.
Its adapter directory holds the six adapters and malicious ones. Every probe asserts the status, that
the answer names the problem without the server's paths, and that the server is up afterwards and
answers a normal request exactly (transformers + PEFT). Where vLLM alone answers the same input, the
answer is compared with a server of vLLM as shipped (no plugin) started the same way.
"""

import functools
import http.client
import json
import math
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from engine_util import (
    ADAPTER_DIR,
    ADAPTERS,
    ENGINE_ARGS,
    adapter_path,
    assert_matches,
    greedy_completion,
    serve_for_module,
    server_args,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIDDLEWARE = "dlplora_triton.integrations.vllm.routed.RoutingMiddleware"
MAX_TOKENS = 4
NORMAL = (("de", 0.7), ("code", 0.3))  # the normal request each probe is followed by


def _malicious_adapters(root):
    """The six adapters (links) and malicious ones, each a folder a client may name."""
    import torch
    from safetensors.torch import load_file, save_file

    root.mkdir()
    for name in ADAPTERS:
        (root / name).symlink_to(ADAPTER_DIR / name)

    def copy(name, **config_changes):
        folder = root / name
        shutil.copytree(ADAPTER_DIR / "de", folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(dict(config, **config_changes)))
        return folder

    weights = copy("truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folder = copy("nanweights")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(
        {k: torch.full_like(v, math.nan) for k, v in tensors.items()}, folder / "adapter_model.safetensors"
    )
    copy("hugerank", r=1 << 20, rank_pattern={})
    copy("dora", use_dora=True)
    copy("wrongtargets", target_modules=["no_such_module"])
    folder = copy("pickleonly")
    (folder / "adapter_model.safetensors").unlink()
    # A pickle that would run code when unpickled without weights_only: it must never be loaded.
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/dlplora-pwned'\ntR.")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    from dlplora_triton.demo.tasks import load_texts
    from dlplora_triton.routing import Router

    texts, tasks = load_texts()
    router = Router.train(texts, tasks, adapters=list(ADAPTERS), seed=0)
    return router.save(tmp_path_factory.mktemp("router") / "router")


@pytest.fixture(scope="module")
def server(tmp_path_factory, router_dir, request):
    root = tmp_path_factory.mktemp("security")
    adapters = _malicious_adapters(root / "adapters")
    env = {
        "DLPLORA_VLLM_ADAPTER_DIR": str(adapters),
        "DLPLORA_ROUTER_DIR": str(router_dir),
        "DLPLORA_ROUTE_TOP_K": "3",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
    }
    yield from serve_for_module(
        request, root / "server.log", server_args("--api-key", KEY, "--middleware", MIDDLEWARE), env=env
    )


@functools.cache
def keyed_client(url: str):
    """The ``openai`` client of a server, with its key."""
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(server):
    return keyed_client(server.url)


@pytest.fixture(scope="module")
def vllm_alone(tmp_path_factory, request):
    """vLLM as shipped (the plugin not loaded), the same model, key and adapters."""
    root = tmp_path_factory.mktemp("alone")
    env = {"VLLM_PLUGINS": "", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    yield from serve_for_module(request, root / "server.log", server_args("--api-key", KEY), env=env)


# -- a raw HTTP client -----------------------------------------------------------------------------------


def call(server, path, body=None, headers=AUTH, method="POST", timeout=120):
    """``(status, parsed JSON body or text, headers)``; ``body`` is JSON-encoded unless bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        all_headers = {"Content-Type": "application/json", **headers}
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def message(answer) -> str:
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))
        return str(error if error is not None else answer)
    return str(answer)


def completion(model, **extra):
    return {"model": model, "prompt": "Hallo", "max_tokens": 2, **extra}


ENDPOINT_BODIES = {
    "/v1/completions": lambda m: {"model": m, "prompt": "Hallo", "max_tokens": 2},
    "/v1/chat/completions": lambda m: {
        "model": m,
        "messages": [{"role": "user", "content": "Hallo"}],
        "max_tokens": 2,
    },
    "/v1/messages": lambda m: {
        "model": m,
        "messages": [{"role": "user", "content": "Hallo"}],
        "max_tokens": 2,
    },
    "/v1/responses": lambda m: {"model": m, "input": "Hallo", "max_output_tokens": 2},
    "/v1/chat/completions/batch": lambda m: {
        "model": m,
        "messages": [[{"role": "user", "content": "Hallo"}]],
        "max_tokens": 2,
    },
    "/tokenize": lambda m: {"model": m, "prompt": "Hallo"},
    "/v1/load_lora_adapter": lambda m: {"lora_name": m, "lora_path": adapter_path("fr")},
}


@pytest.fixture(scope="module")
def reference_normal(reference, prompts):
    return reference.greedy(prompts[0], NORMAL, MAX_TOKENS)


def assert_healthy(server, prompts, reference_normal, what=""):
    """The server is up, and a normal mix is answered exactly."""
    assert server.alive(), f"the server died after {what}"
    got = greedy_completion(keyed_client(server.url), prompts[0], NORMAL, MAX_TOKENS)
    assert_matches(*got, reference_normal, f"after {what}")


def assert_no_leak(server_root, answer):
    text = json.dumps(answer) if not isinstance(answer, str) else answer
    for secret in (str(server_root), str(ADAPTER_DIR), "/tmp/"):
        assert secret not in text, f"the answer shows a path: {text[:300]}"


# -- 1. authentication first ----------------------------------------------------------------------------


NO_KEY_BODIES = [
    ("/v1/completions", completion("auto")),
    ("/v1/completions", completion("mix:de=0.5,fr=0.5")),
    ("/v1/completions", completion("ja")),  # a folder of the adapter directory, not loaded yet
    (
        "/v1/chat/completions",
        {"model": "auto", "messages": [{"role": "user", "content": "Wie lösche ich das?"}]},
    ),
    ("/v1/completions", completion("mix:" + ",".join(f"a{i}=1" for i in range(40_000)))),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/completions", completion("mix:nosuch=1")),
    ("/v1/messages", {"model": "mix:de=0.2,code=2.5", "messages": [], "max_tokens": 2}),
]


@pytest.mark.parametrize("path, body", NO_KEY_BODIES, ids=range(len(NO_KEY_BODIES)))
def test_without_a_key_nothing_happens_before_the_401(server, path, body):
    before = server.metrics()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, answer, response_headers = call(server, path, body, headers=headers)
        assert status == 401 and answer == {"error": "Unauthorized"}, answer
        assert not any(h.startswith("x-dlplora") for h in response_headers), response_headers
    status, models, _ = call(server, "/v1/models", method="GET")
    assert status == 200 and "ja" not in {m["id"] for m in models["data"]}, (
        "a folder was loaded without a key"
    )
    routes = [line for line in server.metrics().splitlines() if line.startswith("dlplora_routes_total")]
    assert routes == [line for line in before.splitlines() if line.startswith("dlplora_routes_total")]


def test_without_a_key_the_body_is_never_read(server):
    # vLLM's authentication answers from the headers: a huge body, or none at all, gets its 401 at once.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60000000\r\n\r\n"
        )
        start = time.perf_counter()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert time.perf_counter() - start < 5


def test_answers_without_a_key_equal_vllm_alone(server, vllm_alone):
    for path, body in NO_KEY_BODIES:
        ours = call(server, path, body, headers={})
        theirs = call(vllm_alone, path, body, headers={})
        assert ours[:2] == theirs[:2], f"{path}: ours {ours[:2]}, vLLM alone {theirs[:2]}"


# -- 2. values that must never stop the engine -------------------------------------------------------------


BAD_MIXES = [
    ("mix:de=1e39", "outside"),
    ("mix:de=-1e39,fr=1", "outside"),
    ("mix:de=3e38", "outside"),  # finite in float32, but it overflows the activations
    ("mix:de=1000.5", "outside"),
    ("mix:de=nan", "not a number"),
    ("mix:de=inf", "not a number"),
    ("mix:de=-0", "sum to 0"),
    ("mix:de=1e-50", "is 0 in float32"),
    ("mix:de=1_0", "not a number"),
    ("mix:de=\u0661", "not a number"),
    ("mix:de\n=1", "not an adapter name"),
    ("mix:de =1", "not an adapter name"),
    ("mix:de=1,\x00=1", "not an adapter name"),
    ("mix:../de=1", "not an adapter name"),
    ("mix:/etc=1", "not an adapter name"),
    ("mix:de%2f..=1", "not an adapter name"),
    ("mix:..=1", "not an adapter name"),
    ("mix:" + ",".join(f"a{i}=1" for i in range(40_000)), "max_loras"),
    ("mix:de=0.5,truncated=0.5", "truncated"),
    ("mix:de=0.5,hugerank=0.5", "max_lora_rank"),
    ("mix:de=0.5,dora=0.5", "DoRA"),
    ("mix:de=0.5,nanweights=0.5", "NaN or inf"),
    ("mix:de=0.5,pickleonly=0.5", "safetensors"),
    ("mix:de=0.5,empty=0.5", "adapter_config.json"),
    ("mix:de=0.5,nosuch=0.5", "not loaded"),
    ("truncated", "truncated"),
    ("pickleonly", "safetensors"),
]


@pytest.mark.parametrize("model, words", BAD_MIXES, ids=[repr(m[:24]) for m, _ in BAD_MIXES])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_mixes_are_4xx_and_the_server_stays_right(
    server, prompts, reference_normal, model, words, stream
):
    start = time.perf_counter()
    status, answer, _ = call(server, "/v1/completions", completion(model, stream=stream))
    assert 400 <= status < 500 and words in message(answer), (status, answer)
    assert time.perf_counter() - start < 5, "the refusal took too long"
    assert_no_leak(server.log_path.parent, answer)
    assert_healthy(server, prompts, reference_normal, repr(model[:40]))


def test_an_adapter_for_modules_the_model_lacks_does_not_stop_the_server(server, prompts, reference_normal):
    # vLLM loads it as it would alone (or refuses it); it must not stop the engine.
    for model in ("wrongtargets", "mix:de=0.5,wrongtargets=0.5"):
        status, answer, _ = call(server, "/v1/completions", completion(model))
        assert status == 200 or 400 <= status < 500, (model, status, answer)
        assert_no_leak(server.log_path.parent, answer)
        assert_healthy(server, prompts, reference_normal, model)
    assert not os.path.exists("/tmp/dlplora-pwned"), "a pickle ran"


def test_a_huge_mix_name_does_not_block_the_server(server):
    name = "mix:" + ",".join(f"a{i}=1" for i in range(40_000))
    with ThreadPoolExecutor(4) as pool:
        big = [pool.submit(call, server, "/v1/completions", completion(name)) for _ in range(3)]
        start = time.perf_counter()
        assert server.healthy()
        assert time.perf_counter() - start < 2
        assert all(f.result()[0] == 400 for f in big)


# -- 3. no adapter from anywhere, no mix argument from a client --------------------------------------------


def _forged(path):
    return json.dumps([["fr", 1, path, 1.0]])


@pytest.mark.parametrize("endpoint", sorted(ENDPOINT_BODIES))
def test_no_endpoint_takes_a_clients_mix_argument(server, prompts, reference_normal, endpoint):
    for xargs in (
        {"dlplora_mix": _forged(adapter_path("fr"))},
        {"dlplora_mix": _forged("/etc")},
        {"dlplora_mix_signature": "0" * 64},
    ):
        body = dict(ENDPOINT_BODIES[endpoint]("de"), vllm_xargs=xargs)
        status, answer, _ = call(server, endpoint, body)
        assert status == 400 and "set by the server" in message(answer), (endpoint, status, answer)
    # Nested: in a batch's items, or in token-in-token-out sampling parameters.
    nested = {"requests": [{"sampling_params": {"extra_args": {"dlplora_mix": _forged("/etc")}}}]}
    status, answer, _ = call(server, endpoint, dict(ENDPOINT_BODIES[endpoint]("de"), **nested))
    assert status == 400, (endpoint, status, answer)
    assert_healthy(server, prompts, reference_normal, endpoint)


@pytest.mark.parametrize(
    "endpoint", sorted(set(ENDPOINT_BODIES) - {"/v1/completions", "/v1/chat/completions"})
)
def test_other_endpoints_refuse_auto_and_mix_names(server, client, endpoint):
    # While the same mix is in flight on /v1/completions, other endpoints must not see it.
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            call(server, "/v1/completions", completion("mix:de=0.2,code=2.5", max_tokens=16))

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        time.sleep(0.5)
        for model in ("mix:de=0.2,code=2.5", "auto"):
            status, answer, _ = call(server, endpoint, ENDPOINT_BODIES[endpoint](model))
            assert status == 400 and "served on" in message(answer), (endpoint, model, status, answer)
        names = {m.id for m in client.models.list().data}
        assert not any(n.startswith("mix:") for n in names), names
    finally:
        stop.set()
        busy.join()


def test_every_post_endpoint_of_the_server_refuses_mix_arguments(server):
    status, spec, _ = call(server, "/openapi.json", method="GET")
    assert status == 200
    posts = sorted(p for p, ops in spec["paths"].items() if "post" in ops)
    assert "/v1/completions" in posts and len(posts) > 10
    for path in posts:
        url = path.replace("{", "").replace("}", "")  # path parameters become their names
        body = {"model": "de", "vllm_xargs": {"dlplora_mix": _forged("/etc")}}
        status, answer, _ = call(server, url, body)
        assert status == 400 and "set by the server" in message(answer), (path, status, answer)
    assert server.alive()


def test_mix_metrics_name_adapters_not_weights(server):
    for weight in (0.11, 0.22, 0.33):
        status, answer, _ = call(server, "/v1/completions", completion(f"mix:de={weight},code={1 - weight}"))
        assert status == 200, answer
    metrics = server.metrics()
    info = [line for line in metrics.splitlines() if line.startswith("vllm:lora_requests_info")]
    assert info and not any("mix:" in line for line in info), info
    assert not any("=0.11" in line for line in metrics.splitlines() if line.startswith("vllm:"))


# -- 4. options of auto --------------------------------------------------------------------------------------


BAD_ROUTING = [
    ({"top_k": 2**63}, "routing.top_k"),
    ({"top_k": 1e30}, "routing.top_k"),
    ({"top_k": 5}, "max_loras"),
    ({"top_k": -1}, "routing.top_k"),
    ({"p": math.nan}, "routing.p"),
    ({"p": 1e39}, "routing.p"),
    ({"p": -0.0}, "routing.p"),
    ({"base_threshold": math.inf}, "routing.base_threshold"),
    ({"adapters": ["de"] * 10_000 + ["nosuch"]}, "nosuch"),
    ({"adapters": "de"}, "routing.adapters"),
    ({"x" * 10_000: 1}, "unknown fields"),
]


@pytest.mark.parametrize(
    "routing, words", BAD_ROUTING, ids=[w + str(i) for i, (_, w) in enumerate(BAD_ROUTING)]
)
def test_bad_routing_options_are_4xx_and_not_counted(server, routing, words):
    before = [
        line for line in server.metrics().splitlines() if line.startswith("dlplora_route_seconds_count")
    ]
    body = json.dumps(completion("auto", routing=routing), allow_nan=True).encode()
    status, answer, _ = call(server, "/v1/completions", body)
    assert status == 400 and words in message(answer), (status, answer)
    after = [line for line in server.metrics().splitlines() if line.startswith("dlplora_route_seconds_count")]
    assert before == after, "a refused request was counted as routed"


def test_top_k_up_to_max_loras_is_served(server):
    for k in (1, ENGINE_ARGS["max_loras"]):
        status, answer, headers = call(
            server,
            "/v1/completions",
            completion("auto", prompt="Wie lösche ich einen Benutzer?", routing={"top_k": k, "p": 1.0}),
        )
        assert status == 200, answer
        assert headers["x-dlplora-route"] == "base" or len(headers["x-dlplora-route"].split(",")) <= k


# -- 5. malformed and deep bodies --------------------------------------------------------------------------


MALFORMED = [
    b"{not json",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "auto", "prompt": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    b'{"model": "auto", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}",  # over Python's int limit
    b"\xff\xfe\x00",
    b"",
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/messages"])
def test_malformed_bodies_are_4xx_like_vllm(server, vllm_alone, prompts, reference_normal, body, path):
    status, answer, _ = call(server, path, body)
    assert 400 <= status < 500, (status, answer)
    theirs, _, _ = call(vllm_alone, path, body)
    assert 400 <= theirs < 500, f"vLLM alone answered {theirs}"
    assert_healthy(server, prompts, reference_normal, f"a malformed body on {path}")


def test_a_huge_prompt_is_refused_quickly(server):
    start = time.perf_counter()
    status, answer, _ = call(server, "/v1/completions", completion("auto", prompt="Hallo " * 2_000_000))
    assert 400 <= status < 500, answer
    assert time.perf_counter() - start < 30


# -- 6. concurrency ---------------------------------------------------------------------------------------


def test_concurrent_first_loads_of_one_folder_all_succeed(server, prompts, reference):
    ids = prompts[3]
    body = {"model": "ru", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    body.update(return_token_ids=True, ignore_eos=True)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: call(server, "/v1/completions", body), range(8)))
    assert [status for status, _, _ in answers] == [200] * 8, [a for s, a, _ in answers if s != 200]
    ref = reference.greedy(ids, (("ru", 1.0),), MAX_TOKENS)
    for _, answer, _ in answers:
        choice = answer["choices"][0]
        assert_matches(choice["token_ids"], choice["logprobs"]["token_logprobs"], ref, "a first load")


def test_loads_racing_with_unloads(server, prompts, reference_normal):
    def mixes():
        return [call(server, "/v1/completions", completion("mix:ja=0.5,de=0.5"))[0] for _ in range(6)]

    def unloads():
        out = []
        for _ in range(6):
            out.append(call(server, "/v1/unload_lora_adapter", {"lora_name": "ja"})[0])
            time.sleep(0.05)
        return out

    with ThreadPoolExecutor(3) as pool:
        results = [pool.submit(mixes), pool.submit(mixes), pool.submit(unloads)]
        statuses = [s for f in results for s in f.result()]
    assert all(s < 500 for s in statuses), statuses
    assert_healthy(server, prompts, reference_normal, "loads racing with unloads")


def test_a_slow_client_does_not_block_others(server, prompts, reference_normal):
    body = json.dumps(completion("mix:de=0.5,code=0.5")).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        s.sendall(body[:10])  # ... and the rest never comes while others are served
        start = time.perf_counter()
        assert_healthy(server, prompts, reference_normal, "a slow client")
        assert time.perf_counter() - start < 30


# -- 7. the fuzzer ------------------------------------------------------------------------------------------
#
# hypothesis draws auto and mix: requests: valid mixes of the six adapters, hostile ones (adapter names
# served, unknown, malicious or arbitrary text with control characters; weights any float or text:
# NaN, inf, 1e39, -0, subnormals; components from none to thousands), and auto with valid routing
# options or ones of any JSON type. Every answer must be a 2xx or a 4xx naming
# a field, the server must stay up, and a served mix of real adapters with modest weights must equal
# transformers + PEFT. `make test` runs FUZZ_EXAMPLES (seeded); `make fuzz-serve` runs more and
# records the count in bench/results/cpu/fuzz_serve.json.

FUZZ_EXAMPLES = int(os.environ.get("DLPLORA_FUZZ_EXAMPLES", "150"))
FUZZ_RECORD = os.environ.get("DLPLORA_FUZZ_RECORD")
NAMES = st.one_of(
    st.sampled_from(
        [*ADAPTERS, "nosuch", "truncated", "hugerank", "pickleonly", "empty", "..", "de/..", "auto"]
    ),
    st.text(min_size=0, max_size=12),
)
WEIGHT_TEXTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-3, max_value=3).map(lambda w: repr(round(w, 3))),
    st.sampled_from(["1e39", "-1e39", "-0", "1e-50", "1_0", "\u0661", "0x1", " 1", "", "nan", "1e308"]),
    st.text(max_size=8),
)
MIX_NAMES = st.one_of(
    st.lists(st.tuples(NAMES, WEIGHT_TEXTS), min_size=0, max_size=6).map(
        lambda parts: "mix:" + ",".join(f"{n}={w}" for n, w in parts)
    ),
    st.integers(min_value=5, max_value=5000).map(lambda n: "mix:" + ",".join(f"a{i}=1" for i in range(n))),
    st.text(max_size=40).map(lambda t: "mix:" + t),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
VALID_MIXES = (
    st.lists(st.sampled_from(ADAPTERS), min_size=1, max_size=3, unique=True)
    .flatmap(
        lambda names: st.tuples(
            st.just(names), st.lists(st.integers(-3000, 3000), min_size=len(names), max_size=len(names))
        )
    )
    .filter(lambda nw: sum(nw[1]) != 0)
    .map(lambda nw: "mix:" + ",".join(f"{n}={w / 1000!r}" for n, w in zip(*nw)))
)
VALID_ROUTING = st.fixed_dictionaries(
    {},
    optional={
        "p": st.floats(min_value=0.05, max_value=1.0),
        "top_k": st.integers(1, ENGINE_ARGS["max_loras"]),
        "adapters": st.lists(st.sampled_from(ADAPTERS), min_size=1, max_size=6, unique=True),
        "base_threshold": st.floats(min_value=0.05, max_value=1.0),
    },
)
ROUTING = st.one_of(
    VALID_ROUTING,
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "p": st.one_of(st.floats(), JSON_VALUES),
            "top_k": st.one_of(st.integers(), st.floats(), JSON_VALUES),
            "adapters": st.one_of(st.lists(NAMES, max_size=8), JSON_VALUES),
            "base_threshold": st.one_of(st.floats(), JSON_VALUES),
        },
    ),
    JSON_VALUES,
)
SENT = {"requests": 0, "statuses": {}, "checked_against_peft": 0}


def _served_exactly(model) -> tuple | None:
    """The mix of a mix name the reference can check (real adapters, modest weights), else None."""
    from dlplora_triton.integrations.vllm.mixes import parse_mix_name

    try:
        pairs = parse_mix_name(model, max_components=ENGINE_ARGS["max_loras"])
    except ValueError:
        return None
    if pairs and all(n in ADAPTERS and abs(w) <= 4 for n, w in pairs):
        return tuple(pairs)
    return None


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    model=st.one_of(VALID_MIXES, MIX_NAMES, st.just("auto")),
    routing=ROUTING,
    chat=st.booleans(),
    stream=st.booleans(),
)
def test_fuzzed_auto_and_mix_requests_never_stop_the_server(
    server, prompts, reference, model, routing, chat, stream
):
    ids = prompts[len(model) % len(prompts)]
    body = {"model": model, "max_tokens": 2, "temperature": 0, "stream": stream, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "Wie lösche ich einen Benutzer?"}]
    else:
        body.update(prompt=ids, return_token_ids=True)
    if model == "auto" and routing is not None:
        body["routing"] = routing
    status, answer, _ = call(
        server, "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode()
    )
    SENT["requests"] += 1
    SENT["statuses"][status] = SENT["statuses"].get(status, 0) + 1
    assert status == 200 or 400 <= status < 500, (model[:80], routing, status, answer)
    if status != 200:
        assert message(answer), answer
        assert_no_leak(server.log_path.parent, answer)
    elif not chat and not stream and (mix := _served_exactly(model)) is not None:
        tokens = answer["choices"][0]["token_ids"]
        assert tokens == reference.greedy(ids, mix, 2)[0], model
        SENT["checked_against_peft"] += 1
    assert server.healthy(), f"the server stopped after {model[:80]!r}"


def test_the_fuzzer_ran_and_the_server_is_right(server, prompts, reference_normal):
    assert SENT["requests"] >= min(FUZZ_EXAMPLES, 1), SENT
    assert_healthy(server, prompts, reference_normal, f"{SENT['requests']} fuzzed requests")
    if FUZZ_RECORD:
        with open(FUZZ_RECORD, "w") as f:
            json.dump(dict(SENT, alive_after=True, examples=FUZZ_EXAMPLES), f, indent=1)
