"""Mixes in vLLM's OpenAI server: ``"model": "mix:de=0.7,code=0.3"`` (an ASGI middleware; docs/vllm.md).

Start vLLM's server with ``--middleware dlplora_triton.integrations.vllm.server.MixMiddleware``
(``dlplora serve`` does). For each completion or chat request whose ``model`` is a mix name, the
middleware, before vLLM sees the request:

1. parses the name (a bad one is a 400 naming the part);
2. finds each component among the server's adapters (``--lora-modules`` or loaded earlier), or loads it
   from ``$DLPLORA_VLLM_ADAPTER_DIR/<name>`` after checking the directory (missing: 404; truncated, not a
   LoRA, rank above ``--max-lora-rank``: 400), so a mix reuses the slots of adapters already loaded;
3. writes the mix into the request's ``vllm_xargs`` and lends vLLM's model registry the mix's anchor
   (:mod:`~dlplora_triton.integrations.vllm.mixes`) under the request's model name until the response
   has been sent. Nothing outlives the request: what the server keeps per mix is bounded by the
   requests in flight.

A plain adapter name found in the adapter directory but not loaded yet is loaded the same way. Every
other request passes through untouched. Errors are vLLM's JSON error body, ``{"error": {"message",
"type", "param", "code"}}``, with the HTTP status in ``code``.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus

from dlplora_triton.integrations.vllm.mixes import (
    ADAPTER_NAME,
    MIX_ARG,
    MIX_PREFIX,
    MixComponent,
    encode_mix,
    parse_mix_name,
)

__all__ = ["ADAPTER_DIR_ENV", "MIX_HEADER", "MixMiddleware", "RequestError"]

logger = logging.getLogger(__name__)

ADAPTER_DIR_ENV = "DLPLORA_VLLM_ADAPTER_DIR"
MIX_HEADER = "x-dlplora-mix"  # the response header naming the mix served (adapter=weight,...)
ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 64 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = "model"):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> bytes:
        kind = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLargeError"}.get(
            int(self.status), "InvalidUserInput"
        )
        error = {"message": self.message, "type": kind, "param": self.param, "code": int(self.status)}
        return json.dumps({"error": error}).encode()


async def send_error(send, error: RequestError) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": int(error.status), "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes", None
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI ``receive`` that yields ``body`` once, then defers to the client's (disconnects)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


class Adapters:
    """The server's adapters by name: vLLM's registry, plus loading from the adapter directory."""

    def __init__(self, state):
        self.models = state.openai_serving_models
        lora_config = state.vllm_config.lora_config
        self.max_loras = lora_config.max_loras if lora_config else 0
        self.max_lora_rank = lora_config.max_lora_rank if lora_config else 0
        self.adapter_dir = os.environ.get(ADAPTER_DIR_ENV) or None
        self.lent: dict[str, list] = {}  # mix name -> [anchor LoRARequest, requests in flight]

    def registered(self, name: str):
        request = self.models.lora_requests.get(name)
        if request is None or name in self.lent:
            return None
        return request

    def can_load(self, name: str) -> bool:
        return (
            bool(self.adapter_dir)
            and ADAPTER_NAME.fullmatch(name) is not None
            and os.path.isdir(os.path.join(self.adapter_dir, name))
        )

    async def get(self, name: str):
        """The ``LoRARequest`` of adapter ``name``, loading it from the adapter directory if needed."""
        request = self.registered(name)
        if request is not None:
            return request
        if not ADAPTER_NAME.fullmatch(name) or not self.can_load(name):
            where = (
                f" or in {self.adapter_dir}" if self.adapter_dir else f" (no ${ADAPTER_DIR_ENV} to load from)"
            )
            known = sorted(n for n in self.models.lora_requests if n not in self.lent)
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"adapter {name!r} is not loaded (loaded: {', '.join(known) or 'none'}){where}",
            )
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        from dlplora_triton.integrations.vllm.engine import check_adapter_dir

        path = os.path.join(self.adapter_dir, name)
        try:
            check_adapter_dir(path, self.max_lora_rank, f"adapter {name!r}")
        except FileNotFoundError as e:
            raise RequestError(HTTPStatus.NOT_FOUND, str(e)) from None
        except ValueError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
        if not isinstance(result, str):  # vLLM's ErrorResponse
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"adapter {name!r} did not load: {result.error.message}"
            )
        logger.info("dlplora: loaded adapter %r from %s", name, path)
        return self.models.lora_requests[name]

    def lend(self, name: str, anchor) -> None:
        entry = self.lent.setdefault(name, [anchor, 0])
        entry[1] += 1
        self.models.lora_requests[name] = entry[0]

    def give_back(self, name: str) -> None:
        entry = self.lent.get(name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.lent[name]
            self.models.lora_requests.pop(name, None)


class MixMiddleware:
    """ASGI middleware serving ``mix:`` model names in vLLM's OpenAI server (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self._adapters: Adapters | None = None

    def adapters(self, scope) -> Adapters:
        if self._adapters is None:
            self._adapters = Adapters(scope["app"].state)
        return self._adapters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTES:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(receive)
        except ConnectionError:
            return None
        except RequestError as e:
            return await send_error(send, e)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # vLLM answers malformed bodies itself
            return await self.app(scope, replay(body, receive), send)
        try:
            prepared = await self.prepare(scope, payload)
        except RequestError as e:
            return await send_error(send, e)
        if prepared is None:
            return await self.app(scope, replay(body, receive), send)
        payload, lent, headers = prepared
        adapters = self.adapters(scope)
        extra = [(name.encode(), value.encode()) for name, value in headers]

        async def send_with_headers(message):
            if message["type"] == "http.response.start" and extra:
                message = dict(message, headers=[*message.get("headers", []), *extra])
            await send(message)

        try:
            return await self.app(scope, replay(json.dumps(payload).encode(), receive), send_with_headers)
        finally:
            if lent:
                adapters.give_back(lent)

    async def prepare(self, scope, payload: dict):
        """``(payload, lent name or None, [(header, value)])`` for a request to rewrite, None to pass it
        through untouched; RequestError for one to refuse."""
        model = payload.get("model")
        xargs = payload.get("vllm_xargs")
        if isinstance(xargs, dict) and MIX_ARG in xargs:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"vllm_xargs.{MIX_ARG} is set by the server; name a mix in 'model'",
                "vllm_xargs",
            )
        if not isinstance(model, str):
            return None
        adapters = self.adapters(scope)
        if not model.startswith(MIX_PREFIX):
            if adapters.registered(model) is None and adapters.can_load(model):
                await adapters.get(model)  # a plain adapter of the directory, loaded on first use
            return None
        if adapters.max_loras == 0:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "this server has LoRA disabled (start it with --enable-lora)"
            )
        try:
            pairs = parse_mix_name(model, max_components=adapters.max_loras)
        except ValueError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
        components = []
        for name, weight in pairs:
            request = await adapters.get(name)
            components.append(MixComponent(name, request.lora_int_id, request.lora_path, weight))
        if len({c.lora_int_id for c in components}) != len(components):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"mix {model!r} names one adapter twice (under two names)"
            )
        from vllm.lora.request import LoRARequest

        anchor = LoRARequest(
            lora_name=model, lora_int_id=components[0].lora_int_id, lora_path=components[0].lora_path
        )
        payload = dict(payload, vllm_xargs=dict(xargs or {}, **{MIX_ARG: encode_mix(components)}))
        adapters.lend(model, anchor)
        return payload, model, [(MIX_HEADER, ",".join(f"{c.name}={c.weight!r}" for c in components))]
