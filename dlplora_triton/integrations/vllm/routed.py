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
``$DLPLORA_ROUTE_P``, ``$DLPLORA_ROUTE_TOP_K``, and where to save the router after each change in
``$DLPLORA_ROUTER_SAVE_DIR``.

Adapters loaded and unloaded at runtime (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; docs/vllm.md, "Adapters
added and removed at runtime") join and leave routing: a load's ``routing`` examples train the new
adapter's class into a new router beside the one serving (``Router.add_task``, in a worker thread),
which is swapped in, one reference, once vLLM has the adapter; an unload swaps in a router without it
before vLLM drops it. A request reads the reference once (:class:`RoutingState`), so it is routed by the
old router or the new one, whole; an adapter it was routed to is lent to its handler, so an unload
landing between the route and vLLM's lookup does not fail it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import torch

from dlplora_triton.defaults import AUTO_NAME, DEFAULT_P
from dlplora_triton.integrations.vllm.mixes import ADAPTER_NAME, canonical_mix_name
from dlplora_triton.integrations.vllm.server import MixMiddleware, Prepared, RequestError
from dlplora_triton.route_options import RouteOptionError, check_route_options

__all__ = ["AUTO_ENV", "MAX_ROUTE_CHARS", "ROUTE_HEADER", "RoutingMiddleware", "route_text"]

logger = logging.getLogger("vllm.dlplora")  # under vLLM's logger, so the server's log shows it

ROUTER_ENV, P_ENV, TOP_K_ENV, AUTO_ENV, SAVE_ENV = (
    "DLPLORA_ROUTER_DIR",
    "DLPLORA_ROUTE_P",
    "DLPLORA_ROUTE_TOP_K",
    "DLPLORA_AUTO_MODEL",
    "DLPLORA_ROUTER_SAVE_DIR",
)
ROUTE_HEADER = "x-dlplora-route"
MAX_ROUTE_CHARS = 4096  # the router's hashed n-grams of a prompt's start say its task; bounds the cost
ROUTING_FIELDS = ("texts", "file", "task", "method")  # a runtime load's "routing" object


@dataclass
class RoutingState:
    """The router a request is routed by, and its restrictions to subsets of adapters (built on demand).
    Replaced whole, never changed in place but for the cache: a request takes it once. ``empty``: every
    adapter was unloaded, so ``auto`` serves the base model (``router`` is kept to learn new tasks)."""

    router: object
    empty: bool = False
    restricted: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [] if self.empty else list(self.router.names)


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
        self.state = RoutingState(Router.load(router_dir))
        self.save_dir = os.environ.get(SAVE_ENV) or None
        self.auto_name = os.environ.get(AUTO_ENV, AUTO_NAME)
        self.p = float(os.environ.get(P_ENV, DEFAULT_P))
        top_k = os.environ.get(TOP_K_ENV)
        self.top_k = int(top_k) if top_k else None
        _metrics()

    @property
    def router(self):
        """The router serving now (None when every adapter it routed to was unloaded)."""
        state = self.state
        return None if state.empty else state.router

    def _router_among(self, state: RoutingState, adapters, visible=None) -> object | None:
        """The router of ``state`` restricted to the adapters named in ``routing.adapters`` and to those
        ``visible`` allows (a tenant's); None when that leaves none (the base model serves)."""
        names = state.names
        if visible is not None:
            names = [name for name in names if visible(name)]
        if adapters is not None:
            if (
                not isinstance(adapters, list)
                or not adapters
                or not all(isinstance(a, str) for a in adapters)
            ):
                raise RequestError(
                    HTTPStatus.BAD_REQUEST,
                    "routing.adapters must be a non-empty list of adapter names",
                    "routing",
                )
            unknown = sorted(set(adapters) - set(names))
            if unknown:
                shown = [name[:40] for name in unknown[:8]] + (["..."] if len(unknown) > 8 else [])
                raise RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"routing.adapters names {shown}, which the router does not route to (it knows {names})",
                    "routing",
                )
            names = [name for name in names if name in adapters]
        if not names:
            return None
        if len(names) == len(state.names):
            return state.router
        key = tuple(sorted(set(names)))
        if key not in state.restricted:
            if len(state.restricted) >= 64:
                state.restricted.clear()
            state.restricted[key] = state.router.with_adapters(
                {c: a for c, a in state.router.adapter_of.items() if a in key}
            )
        return state.restricted[key]

    async def _swap(self, state: RoutingState) -> str:
        """Serve ``state`` from the next request on (one reference assigned), then save its router to
        ``$DLPLORA_ROUTER_SAVE_DIR`` (if set); returns what now routes."""
        self.state = state
        names = state.names
        if self.save_dir and not state.empty:
            await asyncio.to_thread(state.router.save, self.save_dir)
        saved = (
            " (saved to the router directory of --save-router)" if self.save_dir and not state.empty else ""
        )
        logger.info("dlplora: the router routes to %s", names or "nothing (the base model serves auto)")
        return f"auto routes to {', '.join(names) or 'no adapter (the base model)'}{saved}"

    def _examples(self, scope, routing: dict, task: str) -> list[str]:
        """A runtime load's example texts: ``routing.texts``, or ``routing.file`` (a JSONL file inside the
        adapter directory)."""
        texts, path = routing.get("texts"), routing.get("file")
        if (texts is None) == (path is None):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "routing needs one of 'texts' (a list of str) and 'file'", "routing"
            )
        if path is not None:
            adapters = self.adapters(scope)
            from dlplora_triton.integrations.vllm.runtime import resolve_path

            resolved = resolve_path(adapters, task, path)
            if not os.path.isfile(resolved):
                raise RequestError(
                    HTTPStatus.NOT_FOUND, "routing.file is not a file inside the adapter directory", "routing"
                )
            from dlplora_triton.routing.update import read_examples

            try:
                texts = read_examples(resolved, task, "routing.file")
            except (OSError, ValueError) as e:
                raise RequestError(HTTPStatus.BAD_REQUEST, str(e), "routing") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, "routing.texts must be a list of non-blank strings", "routing"
            )
        from dlplora_triton.routing.update import MAX_ADDED_TEXTS, MIN_ADDED_TEXTS

        if not MIN_ADDED_TEXTS <= len(texts) <= MAX_ADDED_TEXTS:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"routing takes {MIN_ADDED_TEXTS} to {MAX_ADDED_TEXTS} example texts, got {len(texts)}",
                "routing",
            )
        return [text[:MAX_ROUTE_CHARS] for text in texts]

    async def routing_added(self, scope, name: str, routing):
        """The router that also routes to adapter ``name``, built now (training in a worker thread: the
        server keeps routing with the old one), swapped in by the returned callable once vLLM has it.

        ``routing``: ``{"texts": [...]}`` or ``{"file": "<path in the adapter directory>.jsonl"}``, with
        ``"task"`` (the router's class, default ``name``) and ``"method"`` (``Router.add_task``'s). No
        ``routing``: a background class ``name`` of the router (a task it learnt without an adapter, or an
        adapter unloaded earlier) is routed to ``name``, with no training; else routing is unchanged."""
        state = self.state
        if routing is None:
            if name not in state.router.classes or state.router.adapter_of[name] in state.names:
                return None  # no such class, or it is served (by this adapter or another): unchanged
            mapping = {c: (a if a in state.names else None) for c, a in state.router.adapter_of.items()}
            mapping[name] = name
            router = state.router.with_adapters(mapping)
        else:
            if not isinstance(routing, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "routing must be an object", "routing")
            unknown = sorted(set(routing) - set(ROUTING_FIELDS))
            if unknown:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"routing has unknown fields {[u[:40] for u in unknown[:8]]} ({', '.join(ROUTING_FIELDS)})",
                    "routing",
                )
            task = routing.get("task", name)
            method = routing.get("method", "full")
            from dlplora_triton.routing.update import METHODS

            if not isinstance(task, str) or not ADAPTER_NAME.fullmatch(task):
                raise RequestError(HTTPStatus.BAD_REQUEST, "routing.task must be a task name", "routing")
            if method not in METHODS:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"routing.method must be one of {METHODS}", "routing"
                )
            texts = self._examples(scope, routing, task)
            start = time.perf_counter()
            try:
                router = await asyncio.to_thread(self._grow, state, task, name, texts, method)
            except ValueError as e:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"routing: {e}", "routing") from None
            logger.info(
                "dlplora: the router learnt %r for adapter %r from %d texts in %.2f s",
                task,
                name,
                len(texts),
                time.perf_counter() - start,
            )

        async def commit():
            return await self._swap(RoutingState(router))

        return commit

    @staticmethod
    def _grow(state: RoutingState, task: str, adapter: str, texts: list[str], method: str):
        """``Router.add_task`` on the serving router (read, never written), its unloaded adapters kept
        background."""
        grown = state.router.add_task(task, texts, adapter=adapter, method=method)
        served = set(state.names) | {adapter}
        if set(grown.names) != served:
            grown = grown.with_adapters(
                {c: (a if a in served else None) for c, a in grown.adapter_of.items()}
            )
        return grown

    async def routing_removed(self, scope, name: str) -> str | None:
        """Swap in the router without ``name`` (before vLLM drops it); None when it did not route there."""
        state = self.state
        if name not in state.names:
            return None
        router = state.router.without_adapter(name)
        if router is None:
            return await self._swap(RoutingState(state.router, empty=True))
        return await self._swap(RoutingState(router))

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
        state = self.state  # once: an addition or removal swaps it whole, never under this request
        router = self._router_among(
            state, routing.get("adapters") if isinstance(routing, dict) else None, self.visible(scope)
        )
        text = route_text(payload, chat=scope.get("path", "").endswith("/chat/completions"))
        if torch.get_num_threads() != 1:  # set again: vLLM may change it after start-up (see __init__)
            torch.set_num_threads(1)
        start, start_cpu = time.perf_counter(), time.thread_time()
        chosen = []
        if router is not None:  # None: no adapter left to route to (for this tenant)
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
        elif chosen:
            # Lent to this request's handler: an unload landing before vLLM looks the name up finds
            # the adapter this request was routed to all the same.
            prepared = Prepared(payload, lent={model: await adapters.get(model)})
        else:
            prepared = await super().prepare(scope, payload) or Prepared(payload)
        prepared.headers.append((ROUTE_HEADER, label))
        prepared.on_success.append(count)
        return prepared
