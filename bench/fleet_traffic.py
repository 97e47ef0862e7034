"""Multi-tenant traffic for an adapter fleet: Zipf popularity, one adapter / mixes / base, many clients.

Used by the fleet engine test (tests/integrations/vllm/engine/test_fleet.py) and the fleet benchmark
(bench/bench_fleet.py). A request is a *route*: ``()`` for the base model, ``((name, 1.0),)`` for one
adapter, ``((a, wa), (b, wb), ...)`` for a mix (weights rounded to 0.01, summing to 1), sent as the
model name :func:`model_name` (``mix:a=0.6,b=0.4``) to a server running the plugin's mix middleware.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Shares of the traffic (the shape): one adapter, a mix of 2-3, the base model.
ONE, MIX, BASE = 0.6, 0.3, 0.1


def zipf_weights(count: int, alpha: float) -> list[float]:
    """Popularity of the ``count`` adapters in rank order: ``1 / rank**alpha`` (not normalised)."""
    return [1.0 / (rank + 1) ** alpha for rank in range(count)]


def draw_routes(
    names: Sequence[str], count: int, alpha: float, seed: int = 0, shares=(ONE, MIX, BASE)
) -> list[tuple]:
    """``count`` routes: adapters drawn by Zipf popularity (``names[0]`` the hottest); a mix's components
    are distinct draws from the same distribution, with random weights summing to 1."""
    rng = random.Random(seed)
    weights = zipf_weights(len(names), alpha)
    one, mix, _ = shares
    routes = []
    for _ in range(count):
        u = rng.random()
        if u < one:
            routes.append(((rng.choices(names, weights)[0], 1.0),))
        elif u < one + mix:
            size = rng.choice((2, 3))
            chosen: list[str] = []
            while len(chosen) < size:
                name = rng.choices(names, weights)[0]
                if name not in chosen:
                    chosen.append(name)
            raw = [rng.uniform(0.2, 1.0) for _ in chosen]
            cents = [round(100 * w / sum(raw)) for w in raw]
            cents[-1] = 100 - sum(cents[:-1])  # exactly 1 in hundredths
            routes.append(tuple((n, c / 100) for n, c in zip(chosen, cents)))
        else:
            routes.append(())
    return routes


def route_class(route: tuple) -> str:
    """``"base"``, ``"one"`` or ``"mix"``."""
    return "base" if not route else "one" if len(route) == 1 else "mix"


def model_name(route: tuple, base: str) -> str:
    """The OpenAI ``model`` field of a route: ``base``, an adapter's name, or ``mix:a=0.6,b=0.4``."""
    if not route:
        return base
    if len(route) == 1 and route[0][1] == 1.0:
        return route[0][0]
    return "mix:" + ",".join(f"{n}={w:g}" for n, w in route)


@dataclass
class Outcome:
    """One request as its client saw it (times from ``time.monotonic()``)."""

    index: int
    route: tuple
    sent: float
    first_token: float | None = None
    done: float | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent


def complete(client, route, prompt_ids, max_tokens: int, base: str, outcome: Outcome, stream: bool) -> None:
    """One greedy completion through the ``openai`` client, filling ``outcome`` (errors included)."""
    kwargs = dict(
        model=model_name(route, base),
        prompt=prompt_ids,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    try:
        if stream:
            for chunk in client.completions.create(stream=True, **kwargs):
                choice = chunk.choices[0] if chunk.choices else None
                if choice is None:
                    continue
                if outcome.first_token is None and (choice.text or getattr(choice, "token_ids", None)):
                    outcome.first_token = time.monotonic()
                outcome.tokens.extend(getattr(choice, "token_ids", None) or [])
                if choice.logprobs is not None:
                    outcome.logprobs.extend(choice.logprobs.token_logprobs or [])
        else:
            choice = client.completions.create(**kwargs).choices[0]
            outcome.tokens = list(choice.token_ids)
            outcome.logprobs = list(choice.logprobs.token_logprobs)
    except Exception as e:  # noqa: BLE001 - every failure is a result here, reported by the caller
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.done = time.monotonic()


def run_clients(
    client,
    routes: Sequence[tuple],
    prompts: Sequence[list[int]],
    concurrency: int,
    max_tokens: int | Sequence[int],
    base: str,
    stream: bool = False,
    stop: Callable[[], bool] | None = None,
) -> list[Outcome]:
    """Send ``routes`` from ``concurrency`` closed-loop clients (each waits for its answer before its next
    request), request ``i`` with prompt ``prompts[i % len(prompts)]`` and ``max_tokens`` (or
    ``max_tokens[i]``); stops early when ``stop()``."""
    outcomes = [Outcome(i, route, 0.0) for i, route in enumerate(routes)]
    cursor, lock = [0], threading.Lock()

    def client_loop():
        while True:
            with lock:
                i = cursor[0]
                if i >= len(routes) or (stop is not None and stop()):
                    return
                cursor[0] += 1
            outcome = outcomes[i]
            outcome.sent = time.monotonic()
            tokens = max_tokens if isinstance(max_tokens, int) else max_tokens[i]
            complete(client, routes[i], prompts[i % len(prompts)], tokens, base, outcome, stream)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return [o for o in outcomes if o.done is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
