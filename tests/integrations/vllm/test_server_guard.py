"""The mix middleware's guard sits after every other middleware (authentication first), without vLLM.

vLLM adds ``--middleware`` classes outside its own (Starlette's ``add_middleware`` puts the last added
outermost); these tests build a FastAPI app the same way, with an authentication middleware added
before ours, and drive it through ASGI directly. The whole server runs in tests/integrations/vllm/engine/test_security.py.
"""

import asyncio
import json

import pytest
from asgi_call import asgi_request

from dlplora_triton.integrations.vllm.server import MixMiddleware, install_guard

FastAPI = pytest.importorskip("fastapi", reason="vLLM's server stack (make test installs it)").FastAPI


class KeyMiddleware:
    """An operator's authentication: 401 unless ``authorization: Bearer k``, before reading the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (b"authorization", b"Bearer k") not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "Unauthorized"}'})
            return
        await self.app(scope, receive, send)


def _app(*middlewares):
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(body: dict):
        return {"echo": body}

    for middleware in middlewares:  # as vLLM adds them: the last one is the outermost
        app.add_middleware(middleware)
    return app


def _post(app, path, body: bytes, key=True):
    """``(status, body, whether the body was read)`` of one POST through the ASGI app."""
    headers = [(b"content-type", b"application/json")] + ([(b"authorization", b"Bearer k")] if key else [])
    status, payload, _, read = asyncio.run(asgi_request(app, "POST", path, body, headers))
    return status, json.loads(payload), read


def test_without_the_key_the_guard_never_runs():
    app = _app(KeyMiddleware, MixMiddleware)  # ours outermost, as vLLM puts --middleware classes
    status, answer, read = _post(app, "/v1/messages", b'{"model": "mix:de=1"}', key=False)
    assert status == 401 and answer == {"error": "Unauthorized"} and not read


def test_with_the_key_the_guard_refuses_what_only_it_may_serve():
    app = _app(KeyMiddleware, MixMiddleware)
    status, answer, _ = _post(app, "/v1/messages", b'{"model": "mix:de=1"}')
    assert status == 400 and "served on /v1/completions" in answer["error"]["message"]
    forged = {"model": "de", "vllm_xargs": {"dlplora_mix": '[["de", 1, "/etc", 1.0]]'}}
    status, answer, _ = _post(app, "/v1/messages", json.dumps(forged).encode())
    assert status == 400 and "set by the server" in answer["error"]["message"]
    status, answer, _ = _post(app, "/v1/messages", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in answer["error"]["message"]
    status, answer, _ = _post(app, "/v1/messages", b'{"model": "de"}')  # the rest reaches the route
    assert status == 200 and answer == {"echo": {"model": "de"}}


def test_the_guard_needs_a_way_to_the_router():
    class Opaque:  # a middleware that keeps its next app under another name
        def __init__(self, app):
            self.inner = app

    with pytest.raises(RuntimeError, match="keeps no .app"):
        install_guard(Opaque(object()), lambda scope, receive, send: None)
