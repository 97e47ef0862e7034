"""Adapters loaded and unloaded at runtime join and leave ``"model": "auto"``, and per-key allow-lists
(``$DLPLORA_TENANTS_FILE``), without vLLM.

The routing middleware runs on a FastAPI app standing in for vLLM's server, as in
tests/integrations/vllm/test_routed_handoff.py: its registry of adapters, its runtime load / unload
methods and ``vllm.envs`` are faked (``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` on), the adapter directory is
the package's six SmolLM2 adapters, and the router is a small one trained here on code, de and fr. The
whole server runs in tests/integrations/vllm/engine/test_runtime_routing_engine.py.
"""

import asyncio
import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from asgi_call import asgi_request

from dlplora_triton.integrations.vllm import mixes
from dlplora_triton.routing import Router, read_labelled_jsonl

fastapi = pytest.importorskip("fastapi", reason="vLLM's server stack (make test installs it)")
pytest.importorskip("prometheus_client", reason="vLLM's server stack (make test installs it)")

ROOT = Path(__file__).resolve().parents[3]
ADAPTER_DIR = ROOT / "dlplora_triton" / "data" / "adapters" / "smollm2"
DATA = ROOT / "dlplora_triton" / "data" / "router_texts.jsonl"
SERVED = ["code", "de", "fr"]  # loaded at start, and the router's adapters
KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-0123456789", "ops": "ops-key-0123456789ab"}


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeModels:
    """vLLM's OpenAIServingModels as the middleware uses it; records what the router routed to at each
    unload (it must no longer route there)."""

    def __init__(self):
        self.lora_requests = {
            n: FakeLoRARequest(n, i + 1, str(ADAPTER_DIR / n)) for i, n in enumerate(SERVED)
        }
        self.base_model_paths = [SimpleNamespace(name="smollm2")]
        self.middleware = None  # the RoutingMiddleware, once a test has found it
        self.routed_at_unload = []

    async def load_lora_adapter(self, request):
        await asyncio.sleep(0)
        self.lora_requests[request.lora_name] = FakeLoRARequest(
            request.lora_name, len(self.lora_requests) + 1, request.lora_path
        )
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request):
        if self.middleware is not None:
            self.routed_at_unload.append(self.middleware.state.names)
        del self.lora_requests[request.lora_name]
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


@pytest.fixture(scope="module")
def texts():
    all_texts, tasks = read_labelled_jsonl(DATA)
    per_task: dict[str, list[str]] = {}
    for text, task in zip(all_texts, tasks):
        per_task.setdefault(task, []).append(text)
    return per_task


@pytest.fixture(scope="module")
def router_dir(texts, tmp_path_factory):
    train = [(t, task) for task in SERVED for t in texts[task][:150]]
    router = Router.train(
        [t for t, _ in train],
        [task for _, task in train],
        seed=0,
        num_buckets=2**14,
        hidden=(64,),
        epochs=8,
        batch_size=64,
    )
    return router.save(tmp_path_factory.mktemp("router") / "router")


def _stub_vllm(monkeypatch):
    modules = {}
    for name in (
        "vllm",
        "vllm.lora",
        "vllm.lora.request",
        "vllm.entrypoints",
        "vllm.entrypoints.serve",
        "vllm.entrypoints.serve.lora",
        "vllm.entrypoints.serve.lora.protocol",
    ):
        modules[name] = types.ModuleType(name)
    modules["vllm.lora.request"].LoRARequest = FakeLoRARequest
    protocol = modules["vllm.entrypoints.serve.lora.protocol"]
    protocol.LoadLoRAAdapterRequest = lambda **kw: SimpleNamespace(**kw)
    protocol.UnloadLoRAAdapterRequest = lambda **kw: SimpleNamespace(**kw)
    modules["vllm"].envs = SimpleNamespace(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, VLLM_SKIP_MODEL_NAME_VALIDATION=False
    )
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _make_app(monkeypatch, router_dir, tmp_path, tenants=None):
    _stub_vllm(monkeypatch)
    monkeypatch.setenv("DLPLORA_ROUTER_DIR", str(router_dir))
    monkeypatch.setenv("DLPLORA_VLLM_ADAPTER_DIR", str(ADAPTER_DIR))
    monkeypatch.setenv("DLPLORA_ROUTER_SAVE_DIR", str(tmp_path / "saved"))
    monkeypatch.setenv(mixes.MIX_KEY_ENV, "0" * 64)
    if tenants is None:
        monkeypatch.delenv("DLPLORA_TENANTS_FILE", raising=False)
    else:
        path = tmp_path / "tenants.json"
        path.write_text(json.dumps({"tenants": tenants}))
        os.chmod(path, 0o600)
        monkeypatch.setenv("DLPLORA_TENANTS_FILE", str(path))
    from dlplora_triton.integrations.vllm.routed import RoutingMiddleware

    app = fastapi.FastAPI()
    models = FakeModels()
    app.state.openai_serving_models = models
    app.state.vllm_config = SimpleNamespace(lora_config=SimpleNamespace(max_loras=4, max_lora_rank=16))

    @app.post("/v1/completions")
    async def completions(body: dict, request: fastapi.Request):
        registry = request.app.state.openai_serving_models.lora_requests
        if body["model"] != "smollm2" and body["model"] not in registry:
            return fastapi.responses.JSONResponse({"error": "vLLM: no such model"}, status_code=404)
        return {"model": body["model"]}

    @app.get("/v1/models")
    async def list_models(request: fastapi.Request):
        names = ["smollm2", *request.app.state.openai_serving_models.lora_requests]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "root": "/secret/" + n} for n in names],
        }

    @app.get("/health")
    async def health():
        return {}

    app.add_middleware(RoutingMiddleware)
    return app, models


@pytest.fixture
def served(monkeypatch, router_dir, tmp_path):
    threads = torch.get_num_threads()
    app, models = _make_app(monkeypatch, router_dir, tmp_path)
    yield app, models
    torch.set_num_threads(threads)


async def _request(app, method, path, body=None, key=None):
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode()))
    raw = json.dumps(body).encode() if body is not None else b""
    status, payload, answer_headers, read = await asgi_request(app, method, path, raw, headers)
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = payload.decode()
    return status, answer, answer_headers, read


def call(app, method, path, body=None, key=None):
    return asyncio.run(_request(app, method, path, body, key))[:3]


def _routing_middleware(app):
    """The RoutingMiddleware instance of the app (built on the first request)."""
    node = app.middleware_stack
    while node is not None and type(node).__name__ != "RoutingMiddleware":
        node = getattr(node, "app", None)
    return node


def _route(app, text, key=None):
    status, answer, headers = call(app, "POST", "/v1/completions", {"model": "auto", "prompt": text}, key)
    assert status == 200, answer
    return headers["x-dlplora-route"]


def test_a_loaded_adapter_joins_routing_and_an_unloaded_one_leaves(served, texts, tmp_path):
    app, models = served
    zh = texts["zh"][400:410]
    assert _route(app, texts["de"][500]) == "de=1.0"
    models.middleware = _routing_middleware(app)
    assert [_route(app, t) for t in zh].count("zh=1.0") == 0
    status, answer, _ = call(
        app, "POST", "/v1/load_lora_adapter", {"lora_name": "zh", "routing": {"texts": texts["zh"][:120]}}
    )
    assert status == 200 and "added successfully" in answer and "auto routes to code, de, fr, zh" in answer
    assert "zh" in models.lora_requests and models.lora_requests["zh"].lora_path == str(ADAPTER_DIR / "zh")
    assert [_route(app, t) for t in zh].count("zh=1.0") >= 6  # a small router learnt it from 120 texts
    assert _route(app, texts["de"][500]).startswith("de=")
    saved = Router.load(tmp_path / "saved")  # --save-router: the router after the change
    assert saved.names == ["code", "de", "fr", "zh"] and saved.report["updates"][-1]["task"] == "zh"

    status, answer, _ = call(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "zh"})
    assert status == 200 and "removed successfully" in answer and "auto routes to code, de, fr" in answer
    assert models.routed_at_unload == [["code", "de", "fr"]]  # out of routing before vLLM dropped it
    assert "zh=1.0" not in {_route(app, t) for t in zh}
    for body in ({"model": "zh", "prompt": "x"}, {"model": "mix:zh=0.5,de=0.5", "prompt": "x"}):
        status, answer, _ = call(app, "POST", "/v1/completions", body)
        assert status == 404 and "'zh' is not" in json.dumps(answer), answer  # not loaded again
    assert Router.load(tmp_path / "saved").names == ["code", "de", "fr"]

    # Loaded again without examples: the router knows the class, and routes to it again.
    status, answer, _ = call(app, "POST", "/v1/load_lora_adapter", {"lora_name": "zh"})
    assert status == 200 and "auto routes to code, de, fr, zh" in answer
    assert [_route(app, t) for t in zh].count("zh=1.0") >= 6


def test_routing_during_an_addition_gets_the_old_or_the_new_router(served, texts):
    app, models = served
    ja = texts["ja"][400:440]

    async def scenario():
        load = asyncio.create_task(
            _request(
                app,
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": "ja", "routing": {"texts": texts["ja"][:150]}},
            )
        )
        routes = []
        while not load.done():
            batch = await asyncio.gather(
                *[_request(app, "POST", "/v1/completions", {"model": "auto", "prompt": t}) for t in ja[:8]]
            )
            routes += batch
        return await load, routes

    (status, answer, _, _), routes = asyncio.run(scenario())
    assert status == 200, answer
    assert routes and all(r[0] == 200 for r in routes), [r[:2] for r in routes if r[0] != 200]
    for route in {r[2]["x-dlplora-route"] for r in routes}:  # each by one whole router
        pairs = [] if route == "base" else [pair.split("=") for pair in route.split(",")]
        assert {name for name, _ in pairs} <= {*SERVED, "ja"}, route
        assert not pairs or abs(sum(float(w) for _, w in pairs) - 1) < 1e-5, route
    assert [_route(app, t) for t in ja[8:]].count("ja=1.0") >= 20


def test_runtime_loads_come_from_the_adapter_directory_only(served, texts):
    app, models = served
    cases = [
        ({"lora_name": "zh", "lora_path": "/etc"}, 400, "inside the server's adapter directory"),
        ({"lora_name": "zh", "lora_path": "../../.."}, 400, "inside the server's adapter directory"),
        ({"lora_name": "nosuch"}, 404, "'nosuch'"),
        ({"lora_name": "zh", "load_inplace": True}, 400, "load_inplace is not served here"),
        ({"lora_name": "../zh"}, 400, "lora_name must be an adapter name"),
        ({"lora_name": "de"}, 400, "is loaded already"),
        ({"lora_name": "smollm2"}, 400, "names a model served here"),
        (
            {"lora_name": "zh", "routing": {"texts": ["only a few"] * 5}},
            400,
            "20 to 20000 example texts, got 5",
        ),
        (
            {"lora_name": "zh", "routing": {"file": "/etc/passwd"}},
            400,
            "inside the server's adapter directory",
        ),
        ({"lora_name": "zh", "routing": {"file": "zh/adapter_config.json"}}, 400, "line 1 of routing.file"),
        ({"lora_name": "zh", "routing": {"texts": ["x"] * 30, "extra": 1}}, 400, "unknown fields ['extra']"),
        ({"lora_name": "zh", "nosuch": 1}, 400, "unknown fields ['nosuch']"),
    ]
    for body, status, message in cases:
        got, answer, _ = call(app, "POST", "/v1/load_lora_adapter", body)
        text = json.dumps(answer)
        assert (got, message in text) == (status, True), (body, answer)
        assert str(ADAPTER_DIR) not in text and "/etc/passwd" not in text  # no path of the server
    assert set(models.lora_requests) == set(SERVED)  # nothing was loaded
    # A path inside the directory is what lora_name alone means.
    status, answer, _ = call(
        app, "POST", "/v1/load_lora_adapter", {"lora_name": "zh", "lora_path": str(ADAPTER_DIR / "zh")}
    )
    assert status == 200, answer
    status, answer, _ = call(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "nosuch"})
    assert status == 404


def _tenants():
    return [
        {"name": "acme", "key": KEYS["acme"], "adapters": ["de", "code"]},
        {"name": "globex", "key": KEYS["globex"], "adapters": ["fr", "ja"]},
        {"name": "ops", "key": KEYS["ops"], "adapters": "*", "admin": True},
    ]


@pytest.fixture
def tenants(monkeypatch, router_dir, tmp_path):
    threads = torch.get_num_threads()
    app, models = _make_app(monkeypatch, router_dir, tmp_path, tenants=_tenants())
    yield app, models
    torch.set_num_threads(threads)


def test_each_key_reaches_its_own_adapters_only(tenants, texts):
    app, _ = tenants
    acme, globex = KEYS["acme"], KEYS["globex"]
    status, answer, _, read = asyncio.run(
        _request(app, "POST", "/v1/completions", {"model": "de", "prompt": "x"})
    )
    assert (status, answer, read) == (401, {"error": "Unauthorized"}, False)  # nothing read without a key
    status, *_, read = asyncio.run(
        _request(app, "POST", "/v1/completions", {"model": "de"}, key="wrong-key-0123456789")
    )
    assert (status, read) == (401, False)
    assert call(app, "GET", "/health")[0] == 200  # probes need no key

    # auto routes among the key's adapters only: globex's French goes to the base model for acme.
    assert _route(app, texts["fr"][500], acme) == "base"
    assert _route(app, texts["fr"][500], globex) == "fr=1.0"
    assert _route(app, texts["de"][500], acme) == "de=1.0"
    assert _route(app, texts["de"][500], globex) == "base"

    # Another tenant's adapter is answered as one that does not exist, naming nothing of the other's.
    def refusal(model, key=acme):
        status, answer, headers = call(app, "POST", "/v1/completions", {"model": model, "prompt": "x"}, key)
        assert status == 404 and not any(h.startswith("x-dlplora") for h in headers), answer
        return answer["error"]["message"]

    for theirs, nothing in (("fr", "nosuch"), ("mix:de=0.5,fr=0.5", "mix:de=0.5,nosuch=0.5")):
        message = refusal(theirs)
        assert message.replace("fr", "nosuch") == refusal(nothing), message  # the same words
        assert "code, de" in message and "fr" not in message.replace(theirs, "").replace("'fr'", ""), message
    status, answer, _ = call(
        app,
        "POST",
        "/v1/completions",
        {"model": "auto", "prompt": "x", "routing": {"adapters": ["fr"]}},
        acme,
    )
    assert status == 400 and "it knows ['code', 'de']" in answer["error"]["message"]
    assert call(app, "POST", "/v1/completions", {"model": "de", "prompt": "x"}, acme)[0] == 200
    assert call(app, "POST", "/v1/completions", {"model": "smollm2", "prompt": "x"}, globex)[0] == 200

    listed = {entry["id"] for entry in call(app, "GET", "/v1/models", key=acme)[1]["data"]}
    assert listed == {"smollm2", "de", "code", "auto"}
    listed = {entry["id"] for entry in call(app, "GET", "/v1/models", key=KEYS["ops"])[1]["data"]}
    assert listed == {"smollm2", "de", "code", "fr", "auto"}

    # The operator's endpoints: 403 for a tenant, served for the admin key.
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics", "/v1/messages"):
        status, answer, _ = call(app, "POST", path, {"lora_name": "ja"}, globex)
        assert status == 403 and "this API key may call" in answer["error"]["message"], (path, answer)
    status, answer, _ = call(
        app,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "ja", "routing": {"texts": texts["ja"][:100]}},
        KEYS["ops"],
    )
    assert status == 200, answer
    ja = texts["ja"][500:510]
    assert [_route(app, t, globex) for t in ja].count("ja=1.0") >= 6  # globex reaches ja, now loaded
    assert not any("ja" in _route(app, t, acme) for t in ja)


def test_tenants_files_are_checked(tmp_path):
    from dlplora_triton.integrations.vllm.tenants import read_tenants

    def check(tenants, match, mode=0o600):
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"tenants": tenants}))
        os.chmod(path, mode)
        with pytest.raises(ValueError, match=match) as caught:
            read_tenants(path)
        assert all(key not in str(caught.value) for key in KEYS.values())  # keys are never echoed

    acme = {"name": "acme", "key": KEYS["acme"], "adapters": ["de"]}
    check([acme, dict(acme, name="b")], "same key as another tenant")
    check([acme, dict(acme, key=KEYS["ops"])], "listed twice")
    check([dict(acme, key="short")], "at least 16")
    check([dict(acme, adapters="de")], "list of adapter names")
    check([dict(acme, adapters=["../x"])], "list of adapter names")
    check([dict(acme, key_sha256="ab")], "one of 'key' and 'key_sha256'")
    check([{"name": "a", "key_sha256": "zz" * 32, "adapters": []}], "64 hex digits")
    check([dict(acme, admin="yes")], "'admin' must be true or false")
    check([dict(acme, extra=1)], r"unknown fields \['extra'\]")
    check([acme], "every user of this machine may read it", mode=0o644)
    import hashlib

    path = tmp_path / "ok.json"
    digest = hashlib.sha256(KEYS["acme"].encode()).hexdigest()
    path.write_text(json.dumps({"tenants": [{"name": "acme", "key_sha256": digest, "adapters": ["de"]}]}))
    os.chmod(path, 0o644)  # holds no key: any mode
    ((raw, tenant),) = read_tenants(path)
    assert tenant.allows("de") and not tenant.allows("fr") and not tenant.admin
