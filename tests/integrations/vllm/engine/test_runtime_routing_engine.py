"""``dlplora serve`` with adapters loaded and unloaded at runtime and per-key allow-lists, on the real engine.

One server for the module: ``dlplora serve`` over an adapter directory holding de, code and fr (links
to the package's SmolLM2 adapters), a small router trained here on those three tasks,
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``--save-router`` and ``--tenants`` with two tenants and an
admin. The tests run in order on it: the allow-lists; zh linked into the directory and loaded with
example texts while routed requests keep arriving (every one answered), then routed to, its answer's
tokens equal to transformers + PEFT; zh unloaded, then never routed to nor loaded again on first use.
The same logic without vLLM, case by case: tests/integrations/vllm/test_runtime_routing.py.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_util import (
    ADAPTER_DIR,
    ENGINE_ARGS,
    assert_matches,
    model_folder,
    route_of_header,
    serve_for_module,
)

KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-0123456789", "ops": "ops-key-0123456789ab"}
START = ("de", "code", "fr")
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def texts():
    from dlplora_triton.routing import read_labelled_jsonl

    all_texts, tasks = read_labelled_jsonl(ADAPTER_DIR.parents[1] / "router_texts.jsonl")
    per_task: dict[str, list[str]] = {}
    for text, task in zip(all_texts, tasks):
        per_task.setdefault(task, []).append(text)
    return per_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory, texts):
    from dlplora_triton.routing import Router

    root = tmp_path_factory.mktemp("runtime")
    adapters = root / "adapters"
    adapters.mkdir()
    for name in START:
        (adapters / name).symlink_to(ADAPTER_DIR / name)
    train = [(t, task) for task in START for t in texts[task][:300]]
    router = Router.train(
        [t for t, _ in train], [task for _, task in train], seed=0, num_buckets=2**16, hidden=(128,), epochs=8
    )
    router.save(root / "router")
    tenants = root / "tenants.json"
    tenants.write_text(
        json.dumps(
            {
                "tenants": [
                    {"name": "acme", "key": KEYS["acme"], "adapters": ["de", "code", "zh"]},
                    {"name": "globex", "key": KEYS["globex"], "adapters": ["fr"]},
                    {"name": "ops", "key": KEYS["ops"], "adapters": "*", "admin": True},
                ]
            }
        )
    )
    os.chmod(tenants, 0o600)
    return root


@pytest.fixture(scope="module")
def server(setup, request):
    dlplora = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    args = ["--adapters", str(setup / "adapters"), "--router", str(setup / "router"), "--top-k", "2"]
    args += ["--tenants", str(setup / "tenants.json"), "--save-router", str(setup / "saved")]
    args += ["--model", str(model_folder()), "--served-model-name", "smollm2", "--max-loras", "4"]
    args += [
        "--max-lora-rank",
        "16",
        "--dtype",
        "float32",
        "--max-model-len",
        str(ENGINE_ARGS["max_model_len"]),
    ]
    args += ["--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"])]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    yield from serve_for_module(request, setup / "server.log", args, command=dlplora, env=env)


def _client(server, tenant):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=300)


def _post(server, path, body, tenant=None):
    """``(status, text)`` of a POST with the tenant's key (none: no key)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if tenant is not None:
        headers["Authorization"] = f"Bearer {KEYS[tenant]}"
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _routed(client, text, max_tokens=1):
    raw = client.completions.with_raw_response.create(
        model="auto",
        prompt=text,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return raw.headers["x-dlplora-route"], raw.parse().choices[0]


def test_each_key_reaches_its_own_adapters_only(server, texts):
    acme, globex = _client(server, "acme"), _client(server, "globex")
    assert _post(server, "/v1/completions", {"model": "de", "prompt": "x"})[0] == 401
    assert _routed(acme, texts["fr"][600])[0] == "base"  # globex's French: not acme's to reach
    assert _routed(globex, texts["fr"][600])[0] == "fr=1.0"
    assert "de" in _routed(acme, texts["de"][600])[0]
    theirs = _post(server, "/v1/completions", {"model": "fr", "prompt": "x", "max_tokens": 1}, "acme")
    nothing = _post(server, "/v1/completions", {"model": "nosuch", "prompt": "x", "max_tokens": 1}, "acme")
    assert theirs[0] == nothing[0] == 404 and theirs[1].replace("'fr'", "'nosuch'") == nothing[1]
    status, text = _post(server, "/v1/completions", {"model": "mix:de=0.5,fr=0.5", "prompt": "x"}, "acme")
    assert status == 404 and "code, de" in text
    assert {m.id for m in acme.models.list()} == {"smollm2", "auto", "de", "code"}
    assert {m.id for m in globex.models.list()} == {"smollm2", "auto", "fr"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert _post(server, path, {"lora_name": "fr"}, "globex")[0] == 403


def test_an_adapter_loaded_with_examples_is_routed_to_during_load(server, setup, texts, reference):
    acme = _client(server, "acme")
    zh = texts["zh"][400:406]
    assert not any("zh" in _routed(acme, t)[0] for t in zh)
    (setup / "adapters" / "zh").symlink_to(ADAPTER_DIR / "zh")  # the operator adds the adapter's folder
    body = {"lora_name": "zh", "routing": {"texts": texts["zh"][:200]}}
    probes = [texts[task][440 + i] for i in range(4) for task in ("zh", "de", "code")]
    with ThreadPoolExecutor(8) as pool:
        load = pool.submit(_post, server, "/v1/load_lora_adapter", body, "ops")
        during = list(pool.map(lambda text: _routed(acme, text)[0], probes))
        status, message = load.result()
    assert status == 200 and "auto routes to code, de, fr, zh" in message, message
    assert all(route_of_header(route) is not None for route in during)  # every one answered
    routes = [_routed(acme, t)[0] for t in zh]
    assert routes.count("zh=1.0") >= 4, routes
    header, choice = _routed(acme, zh[0], MAX_TOKENS)
    assert "zh" in dict(route_of_header(header)), header  # zh alone, or a mix with it
    assert_matches(
        list(choice.token_ids),
        list(choice.logprobs.token_logprobs),
        reference.greedy(choice.prompt_token_ids, route_of_header(header), MAX_TOKENS),
        "routed to the adapter loaded at runtime, vs PEFT",
    )
    from dlplora_triton.routing import Router

    assert Router.load(setup / "saved").names == ["code", "de", "fr", "zh"]


def test_an_unloaded_adapter_is_never_routed_to_again(server, setup, texts):
    acme = _client(server, "acme")
    status, message = _post(server, "/v1/unload_lora_adapter", {"lora_name": "zh"}, "ops")
    assert status == 200 and "auto routes to code, de, fr" in message, message
    assert not any("zh" in _routed(acme, t)[0] for t in texts["zh"][400:406])
    status, text = _post(server, "/v1/completions", {"model": "zh", "prompt": "x", "max_tokens": 1}, "acme")
    assert status == 404, text  # its folder is still there: not loaded again on first use
    from dlplora_triton.routing import Router

    assert Router.load(setup / "saved").names == ["code", "de", "fr"]
