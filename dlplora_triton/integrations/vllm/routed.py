"""DLP-LoRA routing inside vLLM's OpenAI server: ``"model": "auto"`` (an ASGI middleware; docs/vllm.md).

:class:`RoutingMiddleware` extends :class:`~dlplora_triton.integrations.vllm.server.MixMiddleware`: a
completion or chat request whose ``model`` is the auto name (``$DLPLORA_AUTO_MODEL``, default ``auto``)
is routed once, before vLLM sees it, and then served as the chosen mix, batched with every other
request:

1. the router reads the text: a completion's ``prompt`` (one string), or a chat request's last user
   message (its text parts). The last user turn is the request: a deployment's system prompt is the
   same for every request and earlier turns are context, so neither says which task this one is.
   Texts longer than ``MAX_ROUTE_CHARS`` are routed on their start;
2. ``Router.route`` keeps the top-p adapters with their weights, or abstains (the base model serves
   the request); per-request overrides in the body's ``"routing"`` object: ``p``, ``top_k``,
   ``adapters`` (route among these only; the router's other adapters become "none of these"),
   ``base_threshold``;
3. ``model`` becomes the base model's name, the adapter's, or ``mix:<a>=<w>,...``; the response says
   what was chosen in its ``model`` field and in the ``x-dlplora-route`` header (``base`` or
   ``adapter=weight,...``). The server's log and ``/metrics`` (``dlplora_routes_total{adapter}``,
   ``dlplora_route_seconds`` wall time, ``dlplora_route_cpu_seconds`` CPU time) count the routes.

Start-up (``dlplora serve``) passes the router directory and options in ``$DLPLORA_ROUTER_DIR``,
``$DLPLORA_ROUTE_P``, ``$DLPLORA_ROUTE_TOP_K``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from http import HTTPStatus

import torch

from dlplora_triton.defaults import AUTO_NAME, DEFAULT_P
from dlplora_triton.integrations.vllm.mixes import canonical_mix_name
from dlplora_triton.integrations.vllm.server import MixMiddleware, Prepared, RequestError
from dlplora_triton.route_options import RouteOptionError, check_route_options

__all__ = ["AUTO_ENV", "MAX_ROUTE_CHARS", "ROUTE_HEADER", "RoutingMiddleware", "route_text"]

logger = logging.getLogger("vllm.dlplora")  # under vLLM's logger, so the server's log shows it

ROUTER_ENV, P_ENV, TOP_K_ENV, AUTO_ENV = (
    "DLPLORA_ROUTER_DIR",
    "DLPLORA_ROUTE_P",
    "DLPLORA_ROUTE_TOP_K",
    "DLPLORA_AUTO_MODEL",
)
ROUTE_HEADER = "x-dlplora-route"
MAX_ROUTE_CHARS = 4096  # the router's hashed n-grams of a prompt's start say its task; bounds the cost


def route_text(payload: dict, chat: bool) -> str:
    """The text the router reads; RequestError (400) naming why there is none."""
    if chat:
        messages = payload.get("messages")
        if messages is None and "prompt" in payload:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "this is /v1/chat/completions, which reads 'messages'; a body with a 'prompt' goes to "
                "/v1/completions",
                "messages",
            )
        if not isinstance(messages, list):
            given = "none were given" if messages is None else f"got {type(messages).__name__}"
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"'messages' must be a list of {{'role', 'content'}} objects; {given}",
                "messages",
            )
        if not messages:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "auto routing reads the last user message: 'messages' is empty",
                "messages",
            )
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "auto routing reads the last user message: there is none", "messages"
            )
        content = users[-1].get("content")
        if isinstance(content, list):
            kinds = [part.get("type") for part in content if isinstance(part, dict)]
            content = "\n".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
            if not content.strip():
                raise RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"auto routing reads the last user message's text; it has none (parts: {kinds}): "
                    "name a model or adapter instead of 'auto'",
                    "messages",
                )
        what = "the last user message"
    else:
        content = payload.get("prompt")
        if content is None and "messages" in payload:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "this is /v1/completions, which reads 'prompt'; a chat body ('messages') goes to "
                "/v1/chat/completions",
                "prompt",
            )
        if isinstance(content, list) and len(content) == 1 and isinstance(content[0], str):
            content = content[0]
        if isinstance(content, list):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "auto routing reads one prompt given as text; send one string per request (token ids "
                "and prompt lists cannot be routed)",
                "prompt",
            )
        what = "the prompt"
    if not isinstance(content, str) or not content.strip():
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"auto routing has nothing to read: {what} is empty", "prompt"
        )
    return content[:MAX_ROUTE_CHARS]


@functools.lru_cache(maxsize=1)
def _metrics():
    from prometheus_client import Counter, Histogram

    routes = Counter("dlplora_routes", "Routed requests per adapter chosen ('base': none)", ["adapter"])
    buckets = (1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
    seconds = Histogram("dlplora_route_seconds", "The router's wall time per routed request", buckets=buckets)
    cpu = Histogram(
        "dlplora_route_cpu_seconds",
        "The router's CPU time per routed request (its cost, without waits for a busy CPU)",
        buckets=buckets,
    )
    return routes, seconds, cpu


class RoutingMiddleware(MixMiddleware):
    """``"model": "auto"`` routed by the DLP-LoRA router, then served as a mix (module docstring)."""

    def __init__(self, app):
        super().__init__(app)
        from dlplora_triton.routing import Router

        router_dir = os.environ.get(ROUTER_ENV)
        if not router_dir:
            raise RuntimeError(f"RoutingMiddleware needs ${ROUTER_ENV} (dlplora serve sets it)")
        # This process only routes and talks HTTP (the model runs in vLLM's engine processes): one
        # intra-op thread, so the router's own one-thread sections do not resize a thread pool per call.
        torch.set_num_threads(1)
        self.router = Router.load(router_dir)
        self.auto_name = os.environ.get(AUTO_ENV, AUTO_NAME)
        self.p = float(os.environ.get(P_ENV, DEFAULT_P))
        top_k = os.environ.get(TOP_K_ENV)
        self.top_k = int(top_k) if top_k else None
        self._restricted: dict[tuple[str, ...], object] = {}
        _metrics()

    def _router_among(self, adapters) -> object:
        if adapters is None:
            return self.router
        if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) for a in adapters):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "routing.adapters must be a non-empty list of adapter names",
                "routing",
            )
        unknown = sorted(set(adapters) - set(self.router.names))
        if unknown:
            shown = [name[:40] for name in unknown[:8]] + (["..."] if len(unknown) > 8 else [])
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"routing.adapters names {shown}, which the router does not route to (it knows {self.router.names})",
                "routing",
            )
        key = tuple(sorted(set(adapters)))
        if key not in self._restricted:
            if len(self._restricted) >= 64:
                self._restricted.clear()
            self._restricted[key] = self.router.with_adapters(
                {c: a for c, a in self.router.adapter_of.items() if a in key}
            )
        return self._restricted[key]

    def reserved_name(self, name) -> bool:
        return name == self.auto_name or super().reserved_name(name)

    def extra_names(self) -> dict[str, str]:
        return {self.auto_name: "routed by the DLP-LoRA router", **super().extra_names()}

    def _options(self, routing, max_loras: int) -> dict:
        if routing is None:
            return {}
        if not isinstance(routing, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "routing must be an object", "routing")
        unknown = sorted(set(routing) - {"p", "top_k", "adapters", "base_threshold"})
        if unknown:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"routing has unknown fields {[u[:40] for u in unknown[:8]]} (p, top_k, adapters, base_threshold)",
                "routing",
            )
        given = {key: routing[key] for key in ("p", "top_k", "base_threshold") if key in routing}
        try:  # the one check of route options (dlplora_triton.route_options), named as the body names them
            checked = check_route_options(
                **given, max_top_k=max_loras, max_top_k_why="this server's max_loras", explicit=given
            )
        except RouteOptionError as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, err.named(f"routing.{err.field}"), "routing") from None
        return {key: getattr(checked, key) for key in given}

    async def prepare(self, scope, payload: dict):
        routing = payload.get("routing")
        if payload.get("model") != self.auto_name:
            if routing is not None:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"routing applies to model {self.auto_name!r} only", "routing"
                )
            return await super().prepare(scope, payload)
        adapters = self.adapters(scope)
        adapters.require_lora()
        options = self._options(routing, adapters.max_loras)
        router = self._router_among(routing.get("adapters") if isinstance(routing, dict) else None)
        text = route_text(payload, chat=scope.get("path", "").endswith("/chat/completions"))
        if torch.get_num_threads() != 1:  # set again: vLLM may change it after start-up (see __init__)
            torch.set_num_threads(1)
        start, start_cpu = time.perf_counter(), time.thread_time()
        (chosen,) = router.route(
            [text],
            p=options.get("p", self.p),
            # A routed mix needs a slot per adapter: never more than the server holds at once.
            top_k=min(options.get("top_k", self.top_k or adapters.max_loras), adapters.max_loras),
            base_threshold=options.get("base_threshold"),
        )
        elapsed, elapsed_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        if not chosen:
            model, label = adapters.models.base_model_paths[0].name, "base"
        else:
            model = chosen[0][0] if len(chosen) == 1 else canonical_mix_name(chosen)
            label = ",".join(f"{name}={weight!r}" for name, weight in chosen)
        logger.info("dlplora route: %s (%.3f ms)", label, elapsed * 1e3)

        def count():  # once vLLM has accepted the request: refused ones are not routes served
            routes, seconds, cpu = _metrics()
            seconds.observe(elapsed)
            cpu.observe(elapsed_cpu)
            for name in [name for name, _ in chosen] or ["base"]:
                routes.labels(adapter=name).inc()

        payload = {k: v for k, v in payload.items() if k != "routing"}
        payload["model"] = model
        if len(chosen) > 1:  # the router's pairs, handed over as they are: no name parsed back
            prepared = await self.prepare_mix(scope, payload, model, chosen)
        else:
            prepared = await super().prepare(scope, payload) or Prepared(payload)
        prepared.headers.append((ROUTE_HEADER, label))
        prepared.on_success.append(count)
        return prepared
