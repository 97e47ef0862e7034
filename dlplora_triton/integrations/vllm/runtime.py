"""vLLM's runtime adapter endpoints, served by the mix middleware (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
with an adapter directory; docs/vllm.md, "Adapters added and removed at runtime").

:func:`load_adapter` loads from inside the adapter directory only, with the checks of first-use loading,
and lets the middleware's router learn the adapter (:meth:`MixMiddleware.routing_added
<dlplora_triton.integrations.vllm.server.MixMiddleware.routing_added>`) before it is served;
:func:`unload_adapter` takes it out of routing first. The middleware runs one change at a time.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

from dlplora_triton.integrations.vllm.asgi import LOAD_ROUTE, RequestError
from dlplora_triton.integrations.vllm.mixes import ADAPTER_NAME

__all__ = ["load_adapter", "resolve_path", "runtime_updates", "serve_change", "unload_adapter"]

logger = logging.getLogger(__name__)

LOAD_FIELDS = ("lora_name", "lora_path", "load_inplace", "is_3d_lora_weight", "routing")


def runtime_updates(adapters) -> bool:
    """Whether the middleware serves vLLM's runtime load / unload endpoints itself: vLLM has them
    (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and there is an adapter directory to load from."""
    from vllm import envs

    return bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING) and bool(adapters.adapter_dir)


def resolve_path(adapters, name: str, given) -> str:
    """The folder to load adapter ``name`` from at runtime: ``given`` (relative to the adapter
    directory, or absolute) when it lies inside the adapter directory, else its folder ``name``;
    RequestError (400) for a path outside it (a client names adapters, not the server's files).
    Checked on the path as written, ``..`` resolved: symlinks inside the directory are the
    operator's and are followed, as first-use loading does."""
    if given is None:
        given = name
    if not isinstance(given, str) or not given or "\x00" in given:
        raise RequestError(HTTPStatus.BAD_REQUEST, "lora_path must be a non-empty string", "lora_path")
    root = os.path.abspath(adapters.adapter_dir)
    path = os.path.normpath(os.path.join(root, given))
    if not path.startswith(os.path.join(root, "")):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "lora_path must name a folder inside the server's adapter directory (or give lora_name "
            "alone: the folder of that name)",
            "lora_path",
        )
    return path


async def send_text(send, message: str) -> None:
    """A 200 with ``message`` as plain text (what vLLM's runtime endpoints answer)."""
    body = message.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_change(middleware, scope, path: str, payload, send) -> None:
    """Answer a runtime load or unload (``path``) with vLLM's plain-text success message; RequestError
    for one refused."""
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", None)
    change = load_adapter if path == LOAD_ROUTE else unload_adapter
    await send_text(send, await change(middleware, scope, payload))


async def load_adapter(middleware, scope, payload: dict) -> str:
    """``POST /v1/load_lora_adapter`` with runtime updates (:func:`runtime_updates`): the adapter is
    loaded from the adapter directory only (``lora_name``'s folder, or ``lora_path`` inside the
    directory), checked as on first use; :meth:`MixMiddleware.routing_added` prepares the router that
    also routes to it before the load and swaps it in after. vLLM's fields: ``lora_name``,
    ``lora_path``; ours: ``routing``, the router's examples (RoutingMiddleware)."""
    unknown = sorted(set(payload) - set(LOAD_FIELDS))
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"unknown fields {[u[:40] for u in unknown[:8]]} (lora_name, lora_path, routing)",
            None,
        )
    for flag in ("load_inplace", "is_3d_lora_weight"):
        if payload.get(flag) not in (None, False):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"{flag} is not served here (unload the adapter, then load it again)",
                flag,
            )
    name = payload.get("lora_name")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "lora_name must be an adapter name (letters, digits, '_', '.', '-'; at most 128)",
            "lora_name",
        )
    adapters = middleware.adapters(scope)
    adapters.require_lora()
    if name in adapters.base_names() or middleware.reserved_name(name):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name!r} names a model served here", "lora_name")
    loaded = adapters.registered(name) is not None
    path = None
    if not loaded:
        path = resolve_path(adapters, name, payload.get("lora_path"))
        adapters.check(name, path)
    commit = await middleware.routing_added(scope, name, payload.get("routing"))  # built, not yet served
    if loaded:
        if commit is None:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"adapter {name!r} is loaded already (unload it first to load other weights)",
                "lora_name",
            )
        message = f"adapter {name!r} was loaded already"
    else:
        message = await adapters.load_checked(name, path)
    if commit is not None:  # routed to only once the engine has it
        message += "; " + await commit()
    return message


async def unload_adapter(middleware, scope, payload: dict) -> str:
    """``POST /v1/unload_lora_adapter`` with runtime updates: :meth:`MixMiddleware.routing_removed`
    first (no request is routed to it from here on), then the adapter leaves vLLM's registry and is
    not loaded again on first use until loaded again explicitly."""
    unknown = sorted(set(payload) - {"lora_name", "lora_int_id"})
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"unknown fields {[u[:40] for u in unknown[:8]]} (lora_name)", None
        )
    name = payload.get("lora_name")
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise RequestError(HTTPStatus.BAD_REQUEST, "lora_name must be an adapter name", "lora_name")
    adapters = middleware.adapters(scope)
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    routing = await middleware.routing_removed(scope, name)
    if adapters.registered(name) is None:
        if routing:  # routed to, to be loaded on first use: it is not, from now on
            adapters.withdrawn.add(name)
            return f"adapter {name!r} was not loaded; {routing}"
        raise RequestError(HTTPStatus.NOT_FOUND, f"adapter {name!r} is not loaded", "lora_name")
    adapters.withdrawn.add(name)  # bounded by the adapters loaded
    result = await adapters.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    if not isinstance(result, str):
        raise RequestError(HTTPStatus.NOT_FOUND, adapters.redact(result.error.message), "lora_name")
    logger.info("dlplora: unloaded adapter %r", name)
    return result + (f"; {routing}" if routing else "")
