"""``"model": "auto"``: the routing middleware hands the router's pairs to the mix middleware as they are.

No name is written and parsed back on the way: the routed request reaches vLLM with the same body, signed
mix arguments and lent anchor as the same mix named directly, with ``parse_mix_name`` never called. The
middleware runs on a FastAPI app standing in for vLLM's server (its registry of adapters and LoRA config
faked), driven through ASGI as in tests/integrations/vllm/test_server_guard.py; the router is a stub that returns a fixed
choice. vLLM is not imported: ``vllm.lora.request`` is a stand-in module for the test's duration. The
whole server runs in tests/integrations/vllm/engine/test_serve_routed.py and tests/integrations/vllm/engine/test_security.py.
"""

import asyncio
import json
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from asgi_call import asgi_request

from dlplora_triton.integrations.vllm import mixes, server

fastapi = pytest.importorskip("fastapi", reason="vLLM's server stack (make test installs it)")
pytest.importorskip("prometheus_client", reason="vLLM's server stack (make test installs it)")

ADAPTERS = {"de": (1, "/ad/de"), "code": (2, "/ad/code"), "fr": (3, "/ad/fr")}


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class StubRouter:
    names = list(ADAPTERS)
    adapter_of = {name: name for name in ADAPTERS}
    choice: list = []

    def route(self, texts, **options):
        return [list(self.choice) for _ in texts]


@pytest.fixture
def app(monkeypatch, tmp_path):
    from dlplora_triton.routing import Router

    vllm = types.ModuleType("vllm")
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(Router, "load", classmethod(lambda cls, path: StubRouter()))
    monkeypatch.setenv("DLPLORA_ROUTER_DIR", str(tmp_path))
    monkeypatch.delenv("DLPLORA_VLLM_ADAPTER_DIR", raising=False)
    monkeypatch.setenv(mixes.MIX_KEY_ENV, "0" * 64)
    threads = torch.get_num_threads()  # the middleware routes on one thread: give them back after

    from dlplora_triton.integrations.vllm.routed import RoutingMiddleware

    app = fastapi.FastAPI()
    app.state.openai_serving_models = SimpleNamespace(
        lora_requests={n: FakeLoRARequest(n, i, p) for n, (i, p) in ADAPTERS.items()},
        base_model_paths=[SimpleNamespace(name="smollm2")],
    )
    app.state.vllm_config = SimpleNamespace(lora_config=SimpleNamespace(max_loras=4, max_lora_rank=16))

    @app.post("/v1/completions")
    async def completions(body: dict, request: fastapi.Request):
        lent = request.app.state.openai_serving_models.lora_requests.get(body["model"])
        return {"echo": body, "lora": None if lent is None else vars(lent)}

    app.add_middleware(RoutingMiddleware)
    yield app
    torch.set_num_threads(threads)


JSON_HEADERS = [(b"content-type", b"application/json")]


def post(app, body: dict):
    """``(status, answer, headers)`` of one POST to /v1/completions through the ASGI app."""
    status, answer, headers, _ = asyncio.run(
        asgi_request(app, "POST", "/v1/completions", json.dumps(body).encode(), JSON_HEADERS)
    )
    return status, json.loads(answer), headers


@pytest.fixture
def calls(monkeypatch):
    """Counts of parse_mix_name (where the middleware calls it) and of encode_mix."""
    counts = {"parse": 0, "encode": 0}
    parse, encode = server.parse_mix_name, mixes.encode_mix

    def counted_parse(*args, **kwargs):
        counts["parse"] += 1
        return parse(*args, **kwargs)

    def counted_encode(*args, **kwargs):
        counts["encode"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(server, "parse_mix_name", counted_parse)
    monkeypatch.setattr(mixes, "parse_mix_name", counted_parse)
    monkeypatch.setattr(mixes, "encode_mix", counted_encode)
    return counts


def test_a_routed_mix_is_handed_over_as_pairs_and_equals_the_named_mix(app, calls, monkeypatch):
    monkeypatch.setattr(StubRouter, "choice", [("de", 0.7), ("code", 0.3)])
    status, routed, headers = post(app, {"model": "auto", "prompt": "Hallo", "routing": {"p": 0.9}})
    assert status == 200, routed
    assert calls == {"parse": 0, "encode": 1}, "the routed mix went through a name"
    assert headers["x-dlplora-route"] == "de=0.7,code=0.3"
    assert headers["x-dlplora-mix"] == "de=0.7,code=0.3"
    body = routed["echo"]
    assert body["model"] == "mix:de=0.7,code=0.3" and "routing" not in body
    text = mixes.verify_mix_args(body["vllm_xargs"])
    assert mixes.decode_mix(text) == (
        mixes.MixComponent("de", 1, "/ad/de", 0.7),
        mixes.MixComponent("code", 2, "/ad/code", 0.3),
    )
    assert routed["lora"] == {"lora_name": "mix:de=0.7,code=0.3", "lora_int_id": 1, "lora_path": "/ad/de"}

    # The same mix named by a client: parsed once, and what reaches vLLM is the same.
    status, named, headers = post(app, {"model": "mix:de=0.7,code=0.3", "prompt": "Hallo"})
    assert status == 200, named
    assert calls == {"parse": 1, "encode": 2}
    assert "x-dlplora-route" not in headers and headers["x-dlplora-mix"] == "de=0.7,code=0.3"
    assert named == routed


def test_one_adapter_and_the_base_model_are_plain_names(app, calls, monkeypatch):
    for choice, model, route in (([("fr", 1.0)], "fr", "fr=1.0"), ([], "smollm2", "base")):
        monkeypatch.setattr(StubRouter, "choice", choice)
        status, answer, headers = post(app, {"model": "auto", "prompt": "Bonjour"})
        assert status == 200, answer
        assert answer["echo"] == {"model": model, "prompt": "Bonjour"}
        assert headers["x-dlplora-route"] == route and "x-dlplora-mix" not in headers
    assert calls == {"parse": 0, "encode": 0}


def test_a_client_has_no_way_to_hand_over_pairs(app, calls, monkeypatch):
    monkeypatch.setattr(StubRouter, "choice", [("de", 0.7), ("code", 0.3)])
    forged = mixes.mix_args([mixes.MixComponent("fr", 3, "/etc", 1.0)])
    for body in (
        {"model": "auto", "prompt": "Hallo", "vllm_xargs": forged},
        {"model": "auto", "prompt": "Hallo", "vllm_xargs": {"dlplora_mix": forged["dlplora_mix"]}},
        {"model": "auto", "prompt": "Hallo", "routing": {"pairs": [["fr", 1.0]]}},
    ):
        status, answer, headers = post(app, body)
        assert status == 400, answer
        assert not any(h.startswith("x-dlplora") for h in headers), headers
    status, answer, _ = post(app, {"model": "auto", "prompt": "Hallo", "vllm_xargs": "x"})
    assert status == 400 and "vllm_xargs must be an object" in answer["error"]["message"]
    assert calls["encode"] == 1  # the forged arguments above, made by this test
