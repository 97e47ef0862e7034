"""Mixes in vLLM's OpenAI server: ``"model": "mix:de=0.7,code=0.3"`` (an ASGI middleware; docs/vllm.md).

Start vLLM's server with ``--middleware dlplora_triton.integrations.vllm.server.MixMiddleware``
(``dlplora serve`` does). vLLM adds ``--middleware`` classes outside its own (authentication among
them), so the middleware does its work further in: on construction it places a guard between the
app's innermost middleware and its router (:func:`install_guard`). Every request reaches the guard
only after every other middleware has let it through: with ``--api-key`` (or any authentication
middleware the operator adds), nothing is read, loaded, routed or revealed for a request refused with
401.

For each completion or chat request (``SERVED_ROUTES``) whose ``model`` is a mix name, the guard:

1. parses the name (a bad one is a 400 naming the part);
2. finds each component among the server's adapters (``--lora-modules`` or loaded earlier), or loads it
   from ``$DLPLORA_VLLM_ADAPTER_DIR/<name>`` after checking the directory (missing: 404; truncated, not a
   LoRA, rank above ``--max-lora-rank``: 400), so a mix reuses the slots of adapters already loaded;
3. writes the signed mix into the request's ``vllm_xargs`` and lends vLLM's model registry the mix's
   anchor (:mod:`~dlplora_triton.integrations.vllm.mixes`) under the request's model name, visible to
   this request's handler only (a context variable): ``/v1/models`` and every other request never see it.

Steps 2 and 3 are :meth:`MixMiddleware.prepare_mix`, which takes ``(adapter, weight)`` pairs: the parsed
name's, or (``"model": "auto"``) the router's, handed over by the routing middleware as they are.

A plain adapter name found in the adapter directory but not loaded yet is loaded the same way. On every
other endpoint, mix names, and the mix arguments in any field, get a 400 saying where mixes are served.

With ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` and an adapter directory, vLLM's runtime endpoints are served
here (:mod:`~dlplora_triton.integrations.vllm.runtime`): an adapter is loaded from
the adapter directory only (by name, or a path inside it, with the checks of first-use loading), and an
unloaded adapter is not loaded again on first use until it is loaded again explicitly. With
``$DLPLORA_TENANTS_FILE`` every request needs a tenant's key, and a tenant's requests reach, name and
list only its own adapters (:mod:`~dlplora_triton.integrations.vllm.tenants`).
Errors are vLLM's JSON error body, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
status in ``code``; they name adapters, never the server's paths.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from dataclasses import dataclass, field
from http import HTTPStatus

from dlplora_triton.integrations.vllm.asgi import (
    LOAD_ROUTE,
    TENANT_SCOPE_KEY,
    UNLOAD_ROUTE,
    RequestError,
    send_error,
)
from dlplora_triton.integrations.vllm.mixes import (
    ADAPTER_NAME,
    MIX_ARG,
    MIX_PREFIX,
    MIX_SIGNATURE_ARG,
    MixComponent,
    mix_args,
    parse_mix_name,
)

__all__ = ["ADAPTER_DIR_ENV", "MIX_HEADER", "SERVED_ROUTES", "MixMiddleware", "RequestError", "install_guard"]

logger = logging.getLogger(__name__)

ADAPTER_DIR_ENV = "DLPLORA_VLLM_ADAPTER_DIR"
MIX_HEADER = "x-dlplora-mix"  # the response header naming the mix served (adapter=weight,...)
SERVED_ROUTES = ("/v1/completions", "/v1/chat/completions")  # where mix names (and auto) are served
MAX_BODY = 64 * 1024 * 1024
RESERVED_ARGS = (MIX_ARG, MIX_SIGNATURE_ARG)  # extra_args only the server writes
NAME_FIELDS = ("model", "lora_name")  # fields that name a model or adapter on vLLM's endpoints

# The mix anchors lent to the request being handled: {model name: LoRARequest}, per asyncio task.
_LENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dlplora_lent", default=None)


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


def parse_json_body(body: bytes):
    """The parsed body, or None when it is not JSON (vLLM answers that itself); RequestError (400) for
    JSON that Python's parser will not read (nested too deeply, an integer too long), so that nothing
    reaches vLLM unscreened."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the JSON body is nested too deeply", None) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    except ValueError as e:  # valid JSON Python will not read (an integer of over 4300 digits)
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the JSON body cannot be read: {e}", None) from None


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


def is_json(scope) -> bool:
    """Whether the request's body is JSON to FastAPI (no content type, or a JSON one)."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True


def install_guard(app, guard):
    """Put the ASGI app ``guard`` between the innermost middleware below ``app`` and the router, and
    return the router (which ``guard`` calls next).

    Starlette's middlewares keep the next app in ``.app``; ``app`` is the one below ours. RuntimeError
    when a middleware on the way keeps no ``.app`` (the guard cannot be placed after authentication,
    so the server must not start).
    """
    from starlette.routing import Router

    node = app
    while True:
        inner = getattr(node, "app", None)
        if isinstance(inner, Router):
            node.app = guard
            return inner
        if inner is None:
            raise RuntimeError(
                f"MixMiddleware: {type(node).__name__} keeps no .app, so the guard cannot be placed after "
                "authentication; list MixMiddleware first among --middleware"
            )
        node = inner


class LentLoRARequests(dict):
    """vLLM's registry of adapters by name, plus the anchors lent to the request being handled."""

    @staticmethod
    def _lent(name):
        lent = _LENT.get()
        return lent.get(name) if lent else None

    def __contains__(self, name) -> bool:
        return self._lent(name) is not None or dict.__contains__(self, name)

    def __getitem__(self, name):
        lent = self._lent(name)
        return lent if lent is not None else dict.__getitem__(self, name)

    def get(self, name, default=None):
        lent = self._lent(name)
        return lent if lent is not None else dict.get(self, name, default)


class Adapters:
    """The server's adapters by name: vLLM's registry, plus loading from the adapter directory."""

    def __init__(self, state):
        self.models = state.openai_serving_models
        if not isinstance(self.models.lora_requests, LentLoRARequests):
            self.models.lora_requests = LentLoRARequests(self.models.lora_requests)
        lora_config = state.vllm_config.lora_config
        self.max_loras = lora_config.max_loras if lora_config else 0
        self.max_lora_rank = lora_config.max_lora_rank if lora_config else 0
        self.adapter_dir = os.environ.get(ADAPTER_DIR_ENV) or None
        self._loading: dict[str, asyncio.Lock] = {}
        # Unloaded at runtime: not loaded again on first use (only by an explicit load)
        self.withdrawn: set[str] = set()

    def require_lora(self) -> None:
        """RequestError (400) when the server has LoRA disabled: no mix and no route can be served."""
        if self.max_loras == 0:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "this server has LoRA disabled (start it with --enable-lora)"
            )

    def registered(self, name: str):
        return dict.get(self.models.lora_requests, name)

    def loaded_names(self, most: int, visible=None) -> str:
        """The loaded adapters' names, sorted, the first ``most`` of them and how many more ("" for none);
        ``visible``: a predicate on names (a tenant's), the others left out."""
        known = sorted(n for n in self.models.lora_requests if visible is None or visible(n))
        return ", ".join(known[:most]) + (f" and {len(known) - most} more" if len(known) > most else "")

    def base_names(self) -> list[str]:
        return [model.name for model in self.models.base_model_paths]

    def vllm_resolves_names(self) -> bool:
        """Whether vLLM decides on names it does not know itself (skipped validation, LoRA resolvers)."""
        from vllm import envs

        if envs.VLLM_SKIP_MODEL_NAME_VALIDATION:
            return True
        return bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING and getattr(self.models, "lora_resolvers", None))

    def can_load(self, name: str) -> bool:
        return (
            bool(self.adapter_dir)
            and ADAPTER_NAME.fullmatch(name) is not None
            and name not in self.withdrawn
            and os.path.isdir(os.path.join(self.adapter_dir, name))
        )

    def redact(self, message: str) -> str:
        """``message`` without the adapter directory's path (error bodies name adapters, not paths)."""
        if self.adapter_dir:
            for root in {self.adapter_dir, os.path.realpath(self.adapter_dir)}:
                message = message.replace(os.path.join(root, ""), "").replace(root, "<adapter directory>")
        return message

    async def get(self, name: str, visible=None):
        """The ``LoRARequest`` of adapter ``name``, loading it from the adapter directory if needed.

        Concurrent first requests for one adapter load it once: the others wait for that load.
        ``visible``: a predicate on names (a tenant's); an adapter it refuses is answered as one that
        does not exist (the same 404, listing only visible adapters).
        """
        request = self.registered(name) if visible is None or visible(name) else None
        if request is not None:
            return request
        if (visible is not None and not visible(name)) or not self.can_load(name):  # no stat for theirs
            listed = self.loaded_names(20, visible)
            where = (
                " or in the adapter directory"
                if self.adapter_dir
                else f" (no ${ADAPTER_DIR_ENV} to load from)"
            )
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"adapter {name[:128]!r} is not loaded (loaded: {listed or 'none'}){where}",
            )
        # One lock per folder of the directory (so bounded by it); the waiters find the adapter loaded.
        async with self._loading.setdefault(name, asyncio.Lock()):
            return self.registered(name) or await self._load(name)

    def check(self, name: str, path: str) -> None:
        """RequestError (404 / 400) unless ``path`` holds a LoRA this server can load (the checks of
        first-use loading: untruncated, a LoRA, rank at most ``--max-lora-rank``)."""
        from dlplora_triton.adapters import check_adapter_dir

        try:
            check_adapter_dir(path, self.max_lora_rank, f"adapter {name!r}", values=True)
        except FileNotFoundError as e:
            raise RequestError(HTTPStatus.NOT_FOUND, self.redact(str(e))) from None
        except ValueError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, self.redact(str(e))) from None

    async def load_checked(self, name: str, path: str) -> str:
        """Load adapter ``name`` from ``path`` (checked by :meth:`check`) into vLLM: vLLM's message;
        RequestError with vLLM's status and its message, paths redacted."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
        if not isinstance(result, str):  # vLLM's ErrorResponse
            status = result.error.code if result.error.code in (400, 404) else 400
            raise RequestError(
                HTTPStatus(status), f"adapter {name!r} did not load: {self.redact(result.error.message)}"
            )
        self.withdrawn.discard(name)
        logger.info("dlplora: loaded adapter %r from %s", name, path)
        return self.redact(result)

    async def _load(self, name: str):
        path = os.path.join(self.adapter_dir, name)
        self.check(name, path)
        await self.load_checked(name, path)
        return self.registered(name)


@dataclass
class Prepared:
    """A request rewritten for vLLM: its body, the anchors lent to its handler, response headers, and
    what to count once vLLM has accepted it."""

    payload: dict
    lent: dict = field(default_factory=dict)
    headers: list = field(default_factory=list)
    on_success: list = field(default_factory=list)


class MixMiddleware:
    """ASGI middleware serving ``mix:`` model names in vLLM's OpenAI server (see the module docstring)."""

    def __init__(self, app):
        from dlplora_triton.integrations.vllm.tenants import Tenants

        self.app = app
        self._adapters: Adapters | None = None
        self.tenants = Tenants.from_env()  # None: no allow-lists ($DLPLORA_TENANTS_FILE unset)
        self._changing = asyncio.Lock()  # one runtime load or unload at a time
        self._router = install_guard(app, self.guard)

    async def __call__(self, scope, receive, send):
        # The work happens in guard(), after the middlewares below this one (authentication first).
        return await self.app(scope, receive, send)

    def adapters(self, scope) -> Adapters:
        if self._adapters is None:
            self._adapters = Adapters(scope["app"].state)
        return self._adapters

    def reserved_name(self, name) -> bool:
        """Whether ``name`` is a model name only this middleware serves (mix names)."""
        return isinstance(name, str) and name.startswith(MIX_PREFIX)

    def extra_names(self) -> dict[str, str]:
        """Model names this middleware serves besides vLLM's, each with what it does (for the 404)."""
        return {}

    @staticmethod
    def visible(scope):
        """The request's tenant's predicate on adapter names, or None (every adapter: no tenants, or an
        admin's key)."""
        tenant = scope.get(TENANT_SCOPE_KEY)
        return None if tenant is None or tenant.adapters is None else tenant.allows

    def unknown_model(self, adapters: Adapters, model: str, visible=None) -> RequestError:
        """The 404 for a ``model`` nothing here serves, naming what is served (never a path; with
        ``visible``, only the adapters it allows)."""
        base = adapters.base_names()[:1]  # the name answers carry; the others may be paths
        extra = self.extra_names()
        shown = sorted(n for n in adapters.models.lora_requests if visible is None or visible(n))
        known = [*base, *extra, *shown]
        near = [name for name in known if name.casefold() == model.casefold()]
        parts = [f"the base model {base[0]!r}"] if base else []
        parts += [f"{name!r} ({what})" for name, what in extra.items()]
        listed = adapters.loaded_names(12, visible)
        if listed or adapters.adapter_dir:
            folder = " or a folder of the adapter directory" if adapters.adapter_dir else ""
            parts.append(f"an adapter ({listed or 'none loaded'}){folder}")
        if adapters.max_loras:
            parts.append("a mix ('mix:a=0.7,b=0.3')")
        hint = f"did you mean {near[0]!r}? " if near else ""
        return RequestError(
            HTTPStatus.NOT_FOUND,
            f"model {model[:80]!r} is not served here; {hint}name {', '.join(parts[:-1])}"
            + (f" or {parts[-1]}" if len(parts) > 1 else parts[-1] if parts else ""),
        )

    def list_models(self, models: dict, hidden=frozenset()) -> dict:
        """``/v1/models``'s answer as served: each entry's ``root`` (vLLM puts the model's or the adapter's
        path there) becomes its name, :meth:`extra_names` are listed, the names in ``hidden`` (adapters
        of other tenants) are not."""
        data = [
            dict(entry, root=entry.get("id"))
            for entry in models.get("data", [])
            if isinstance(entry, dict) and entry.get("id") not in hidden
        ]
        created = data[0].get("created") if data else None
        for name in self.extra_names():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "dlplora",
                    "root": name,
                    "parent": None,
                    "max_model_len": data[0].get("max_model_len") if data else None,
                    "permission": [],
                }
            )
        return dict(models, data=data)

    async def _models(self, scope, receive, send):
        """``GET /v1/models`` through vLLM, its JSON rewritten by :meth:`list_models`."""
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await finish()

        visible = self.visible(scope)
        hidden = frozenset()
        if visible is not None:
            hidden = frozenset(n for n in self.adapters(scope).models.lora_requests if not visible(n))

        async def finish():
            body = b"".join(chunks)
            if start.get("status") == 200:
                try:
                    body = json.dumps(self.list_models(json.loads(body), hidden)).encode()
                except (ValueError, TypeError, AttributeError):
                    if hidden:  # unreadable, so it cannot be filtered: nothing of it is sent
                        body, start["status"] = b'{"object": "list", "data": []}', 200
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": body})

        return await self._router(scope, receive, capture)

    def reserved_field(self, payload, served: bool) -> RequestError | None:
        """The 400 for a field a client may not send here, or None. Mix arguments are refused anywhere
        in the body; on the endpoints that do not serve mixes, mix names in any name field."""
        stack = [payload]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for key, value in node.items():
                    if key in RESERVED_ARGS:
                        return RequestError(
                            HTTPStatus.BAD_REQUEST,
                            f"{key} is set by the server; name a mix in 'model' on {' or '.join(SERVED_ROUTES)}",
                            "vllm_xargs",
                        )
                    if not served and key in NAME_FIELDS and self.reserved_name(value):
                        return RequestError(
                            HTTPStatus.BAD_REQUEST,
                            f"{key} {value[:80]!r} is served on {' and '.join(SERVED_ROUTES)} only (this "
                            "endpoint serves the base model and adapters by name)",
                            key,
                        )
                    if isinstance(value, (dict, list)):
                        stack.append(value)
            elif isinstance(node, list):
                stack.extend(v for v in node if isinstance(v, (dict, list)))
        return None

    async def guard(self, scope, receive, send):
        """Every request after the other middlewares (authenticated): mix names served, misuse refused."""
        from dlplora_triton.integrations.vllm.tenants import admit

        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if self.tenants is not None and not await admit(self.tenants, scope, path, send):
            return None
        if scope["type"] == "http" and scope.get("method") == "GET" and path == "/v1/models":
            return await self._models(scope, receive, send)
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS") or not is_json(scope):
            return await self._router(scope, receive, send)
        served = scope.get("method") == "POST" and path in SERVED_ROUTES
        try:
            body = await read_body(receive)
            payload = parse_json_body(body)
            refused = self.reserved_field(payload, served)
            if refused is not None:
                raise refused
            if scope.get("method") == "POST" and path in (LOAD_ROUTE, UNLOAD_ROUTE):
                from dlplora_triton.integrations.vllm import runtime

                if runtime.runtime_updates(self.adapters(scope)):  # else vLLM's own (or its 404)
                    async with self._changing:
                        return await runtime.serve_change(self, scope, path, payload, send)
            prepared = await self.prepare(scope, payload) if served and isinstance(payload, dict) else None
        except ConnectionError:
            return None
        except RequestError as e:
            return await send_error(send, e)
        if prepared is None:  # everything else goes to vLLM untouched
            return await self._router(scope, replay(body, receive), send)
        extra = [(name.encode(), value.encode()) for name, value in prepared.headers]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                if extra:
                    message = dict(message, headers=[*message.get("headers", []), *extra])
                if message.get("status", 500) < 400:
                    for count in prepared.on_success:
                        count()
            await send(message)

        token = _LENT.set(prepared.lent or None)
        try:
            body = json.dumps(prepared.payload).encode()
            return await self._router(scope, replay(body, receive), send_with_headers)
        finally:
            _LENT.reset(token)

    async def routing_added(self, scope, name: str, routing):
        """What a runtime load of ``name`` changes in routing, prepared before the load: None (nothing),
        or an async callable that applies it once the adapter is loaded and returns what it did.
        Here: no router, so ``routing`` examples are refused."""
        if routing is not None:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "routing examples need a router (dlplora serve --router)", "routing"
            )
        return None

    async def routing_removed(self, scope, name: str) -> str | None:
        """Remove ``name`` from routing before it is unloaded; what was done, or None. Here: no router."""
        return None

    async def prepare(self, scope, payload: dict) -> Prepared | None:
        """The rewritten request, None to pass it through untouched; RequestError for one to refuse."""
        model = payload.get("model")
        if not isinstance(model, str) or not model:  # no model: vLLM serves its base model
            return None
        adapters = self.adapters(scope)
        visible = self.visible(scope)
        if not model.startswith(MIX_PREFIX):
            if model in adapters.base_names():
                return None
            if visible is not None and not visible(model):
                raise self.unknown_model(adapters, model, visible)  # another tenant's, or nothing
            if adapters.registered(model) is None:
                if adapters.can_load(model):
                    await adapters.get(model)  # a plain adapter of the directory, loaded on first use
                elif not adapters.vllm_resolves_names():
                    raise self.unknown_model(adapters, model, visible)  # vLLM's 404 names only the base
            return None
        self._check_xargs(payload)
        adapters.require_lora()
        try:
            pairs = parse_mix_name(model, max_components=adapters.max_loras)
        except ValueError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
        return await self.prepare_mix(scope, payload, model, pairs)

    @staticmethod
    def _check_xargs(payload: dict) -> None:
        xargs = payload.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "vllm_xargs must be an object", "vllm_xargs")

    async def prepare_mix(self, scope, payload: dict, name: str, pairs) -> Prepared:
        """``payload`` rewritten to serve the mix ``pairs`` (``[(adapter, weight), ...]``) as model ``name``.

        ``pairs`` come from this server only: a client's ``mix:`` name parsed by :meth:`prepare`, or the
        router's choice (:class:`~dlplora_triton.integrations.vllm.routed.RoutingMiddleware` calls this
        method, nothing a client sends reaches it). The mix is encoded once, signed, into ``vllm_xargs``.
        """
        self._check_xargs(payload)
        adapters = self.adapters(scope)
        components = []
        visible = self.visible(scope)
        for adapter, weight in pairs:
            request = await adapters.get(adapter, visible)
            components.append(MixComponent(adapter, request.lora_int_id, request.lora_path, float(weight)))
        if len({c.lora_int_id for c in components}) != len(components):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"mix {name!r} names one adapter twice (under two names)"
            )
        from vllm.lora.request import LoRARequest

        anchor = LoRARequest(
            lora_name=name, lora_int_id=components[0].lora_int_id, lora_path=components[0].lora_path
        )
        payload = dict(
            payload, model=name, vllm_xargs=dict(payload.get("vllm_xargs") or {}, **mix_args(components))
        )
        header = ",".join(f"{c.name}={c.weight!r}" for c in components)
        return Prepared(payload, lent={name: anchor}, headers=[(MIX_HEADER, header)])
