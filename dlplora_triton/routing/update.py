"""Changing a trained router in seconds: a task added (:func:`add_task`), an adapter removed
(:func:`without_adapter`), with no retraining from scratch and no access to the original texts.

A router keeps a *replay sample* (``Router.replay``): up to :data:`REPLAY_PER_CLASS` of its training
texts per class, as the net's inputs (the bucket ids of a text's hashed n-grams, or its pooled hidden
states), never as text. :func:`add_task` adds one output row for the new task (or refits the row of a
class the router already has) and fits, on the new texts and the replay sample, the whole net on a copy
of the feature table (``method="full"``, the default), the MLP alone (``"head"``, the table frozen and
shared) or the new row alone (``"row"``). The replay sample is saved beside the router
(:data:`REPLAY_FILE`; a router saved without one cannot be extended: retrain it). Measured against
retraining from scratch in docs/routing.md ("Adding a task"), with ``bench/bench_router_update.py``.

Every function returns a new :class:`~dlplora_triton.routing.Router` and leaves the one given as it was
(nothing here writes its tensors), so a server can build the new router beside the one it serves with
and swap one reference.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence

import torch

from ..defaults import MIN_TEXTS_PER_TASK
from .net import GENERAL, RouterNet, check_number, check_texts, gather_bags, one_thread, weighted_loss

__all__ = [
    "DEFAULTS",
    "METHODS",
    "MAX_ADDED_TEXTS",
    "MIN_ADDED_TEXTS",
    "REPLAY_FILE",
    "REPLAY_GENERAL",
    "REPLAY_PER_CLASS",
    "add_task",
    "read_examples",
    "replay_inputs",
    "replay_sample",
    "text_vectors",
    "without_adapter",
]

REPLAY_FILE = "router_replay.safetensors"
REPLAY_PER_CLASS = 256  # texts kept per class (their bucket ids: about 1 MB for 10 classes of sentences)
# The general prompts are kept whole (835 of them ship; short, so ~0.2 MB): an added task pulls chat
# towards it, and every chat prompt the fit sees holds it back (docs/routing.md, "Adding a task").
REPLAY_GENERAL = 1024
METHODS = ("full", "head", "row")
# Per method: (epochs, learning rate), from bench/bench_router_update.py (docs/routing.md, "Adding a task")
DEFAULTS = {"full": (5, 3e-3), "head": (20, 5e-3), "row": (1000, 0.05)}
MIN_ADDED_TEXTS = 20  # fewer: refused (the row would fit a handful of sentences); under 50: a warning
MAX_ADDED_TEXTS = 20_000
MAX_EXAMPLES_BYTES = 64 * 1024 * 1024


def read_examples(path: str | os.PathLike, task: str, owner: str = "the examples file") -> list[str]:
    """The texts of a JSONL examples file: one object with a ``"text"`` string per line; lines whose
    ``"task"`` is another task's are skipped (so a labelled text set can be given as it is). ValueError
    naming ``owner`` and the line of anything malformed (not the file's path: a server's error bodies
    name no path); FileNotFoundError for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner} is not a file")
    if os.path.getsize(path) > MAX_EXAMPLES_BYTES:
        raise ValueError(f"{owner} is over {MAX_EXAMPLES_BYTES} bytes")
    texts = []
    with open(path, encoding="utf-8", errors="strict") as lines:
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f'line {number} of {owner} is not a JSON object with a "text" string')
                if row.get("task", task) == task:
                    texts.append(row["text"])
        except UnicodeDecodeError:
            raise ValueError(f"{owner} is not UTF-8 text") from None
    return texts


def text_vectors(net: RouterNet, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[B, width]``: what the net's MLP reads for prepared inputs (the mean of the texts' hashed-feature
    rows, or the given vectors)."""
    with torch.no_grad():
        return (net.embedding(*inputs) if net.embedding is not None else inputs[0]).float()


def _select(inputs: tuple, rows: torch.Tensor) -> tuple:
    """The net's inputs of the texts ``rows`` of a batch's inputs (bags, or vectors)."""
    return gather_bags(*inputs, rows) if len(inputs) == 2 else (inputs[0][rows],)


def _concat(first: tuple, second: tuple) -> tuple:
    """The net's inputs of two batches' texts, one after the other."""
    if len(first) == 2:
        return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1] + first[0].numel()])
    return (torch.cat([first[0], second[0]]),)


def replay_inputs(replay: dict) -> tuple:
    """The net's inputs of a replay sample (``(indices, offsets)`` or ``(vectors,)``)."""
    return (replay["indices"], replay["offsets"]) if "indices" in replay else (replay["vectors"],)


def _as_replay(inputs: tuple, labels: torch.Tensor) -> dict:
    if len(inputs) == 2:
        return {"indices": inputs[0].contiguous(), "offsets": inputs[1].contiguous(), "labels": labels}
    return {"vectors": inputs[0].float().contiguous(), "labels": labels}


def replay_sample(
    take, labels: torch.Tensor, rows: torch.Tensor, seed: int, general: int | None = None
) -> dict:
    """Up to :data:`REPLAY_PER_CLASS` of the texts ``rows`` per class (drawn with ``seed``), and up to
    :data:`REPLAY_GENERAL` of class ``general`` (the general prompts' index, if any), as the net's
    inputs (``take(rows)``): ``{"indices", "offsets", "labels"}`` or ``{"vectors", "labels"}``."""
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for c in torch.unique(labels[rows]).tolist():
        members = rows[labels[rows] == c]
        limit = REPLAY_GENERAL if c == general else REPLAY_PER_CLASS
        kept.append(members[torch.randperm(len(members), generator=gen)[:limit]])
    chosen = torch.sort(torch.cat(kept)).values if kept else rows[:0]
    return _as_replay(take(chosen), labels[chosen].clone())


def _body(net: RouterNet, vectors: torch.Tensor) -> torch.Tensor:
    """The last hidden layer's output (what the output layer reads) of the MLP input ``vectors``."""
    x = net.norm(vectors)
    for layer in list(net.mlp)[:-1]:
        x = layer(x)
    return x


def _grown_net(net: RouterNet, num_classes: int, hidden: list[int], dropout: float) -> RouterNet:
    """A net with ``num_classes`` outputs (at least the old count): the old norm, hidden layers and output
    rows copied, new rows zero, and the old feature table shared (``"full"`` replaces it with a copy
    before fitting; the other methods only read it)."""
    width = net.norm.normalized_shape[0]
    grown = RouterNet(num_classes, hidden, dropout, input_dim=width)
    old, new = net.state_dict(), grown.state_dict()
    with torch.no_grad():
        for key, tensor in new.items():
            if key.startswith("embedding."):
                continue
            source = old[key]
            if tensor.shape == source.shape:
                tensor.copy_(source)
            else:  # the output layer: the old rows, then zero rows for the new classes
                tensor.zero_()
                tensor[: source.shape[0]].copy_(source)
    if net.embedding is not None:
        grown.embedding = net.embedding  # only read here: the fits below never reach it
    grown.eval()
    return grown


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    present = (torch.bincount(labels, minlength=num_classes) > 0).float()
    return present * counts.sum() / (present.sum() * counts)


def _fit_row(net, row, vectors, labels, weight, epochs, lr, label_smoothing):
    """Fit the output row ``row`` alone (full batch Adam); every other weight stays as it is."""
    last = net.mlp[-1]
    with torch.no_grad():
        hidden = _body(net, vectors)
        fixed = last(hidden)
    w = torch.zeros(hidden.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        column = (hidden @ w + b).unsqueeze(1)
        logits = torch.cat([fixed[:, :row], column, fixed[:, row + 1 :]], dim=1)
        loss = weighted_loss(logits, labels, weight, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last.weight[row].copy_(w)
        last.bias[row].copy_(b)
    return loss.item()


def _fit_minibatches(params, logits_of, net, labels, weight, epochs, lr, label_smoothing, gen, fused=None):
    """AdamW minibatches of 128 over ``params`` of ``net``; ``logits_of(rows)`` gives those rows' logits."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, fused=fused)
    net.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        for rows in torch.split(torch.randperm(len(labels), generator=gen), 128):
            loss = weighted_loss(logits_of(rows), labels[rows], weight, label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    return loss.item()


def add_task(
    router,
    name: str,
    texts: Sequence[str],
    adapter: str | None = "",
    *,
    method: str = "full",
    epochs: int | None = None,
    lr: float | None = None,
    label_smoothing: float = 0.1,
    seed: int = 0,
):
    """A new router that also knows task ``name`` from its example ``texts``, served by ``adapter``.

    ``adapter``: the adapter serving the task (default ``""``: the adapter of the same name; ``None``: a
    background task, served by the base model). ``name`` may be a class the router has already (a task it
    was trained on, background or not): its row is fitted again on ``texts`` and it maps to ``adapter``.
    ``method``: ``"full"`` (default) fits the whole net, on a copy of its feature table (16 MB at the
    defaults), on the replay sample and the texts; ``"head"`` the MLP alone (the table frozen and
    shared); ``"row"`` the task's output row alone: the other classes' logits do not change, so old
    texts route as before unless the new row outscores them. ``epochs`` and ``lr``: per method,
    :data:`DEFAULTS`.
    ``texts``: at least :data:`MIN_ADDED_TEXTS` (20; under 50 the report warns), at most
    :data:`MAX_ADDED_TEXTS`. The same router, texts and seed give the same new router, bit for bit.
    ``router.report["updates"]`` gains one entry (task, adapter, method, texts, seconds, warnings).
    ValueError naming the problem: no replay sample, ``GENERAL``, too few texts, a bad method.
    """
    start = time.perf_counter()
    if getattr(router, "replay", None) is None:
        raise ValueError(
            "this router was saved without a replay sample (router_replay.safetensors: saved by dlplora "
            "0.3 and later), so a task cannot be added to it; retrain it with dlplora train-router"
        )
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"the task name must be a non-empty str without surrounding blanks, got {name!r}")
    if name == GENERAL:
        raise ValueError(f"{GENERAL!r} is the general prompts' class; name the task otherwise")
    adapter = name if adapter == "" else adapter
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    texts = check_texts(texts)
    if not MIN_ADDED_TEXTS <= len(texts) <= MAX_ADDED_TEXTS:
        raise ValueError(
            f"adding task {name!r} takes {MIN_ADDED_TEXTS} to {MAX_ADDED_TEXTS} example texts, got {len(texts)}"
        )
    epochs = epochs if epochs is not None else DEFAULTS[method][0]
    lr = lr if lr is not None else DEFAULTS[method][1]
    check_number("epochs", epochs, 1, 100_000, integer=True)
    check_number("lr", lr, 0, 1, low_open=True)
    check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)

    classes = list(router.classes)
    row = classes.index(name) if name in classes else len(classes)
    if row == len(classes):
        classes.append(name)
    mapping = {c: router.adapter_of[c] for c in router.classes}
    mapping[name] = adapter
    old_labels = router.replay["labels"]
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        new_inputs = router._inputs(texts)
        # a class fitted again: its old replay gives way to the new texts
        kept = _select(replay_inputs(router.replay), (old_labels != row).nonzero().flatten())
        inputs = _concat(kept, new_inputs)
        new_label = torch.full((len(texts),), row, dtype=torch.int64)
        labels = torch.cat([old_labels[old_labels != row], new_label])
        net = _grown_net(router.net, len(classes), router.mlp_config["hidden"], router.mlp_config["dropout"])
        weight = _class_weights(labels, len(classes))
        if method == "full":
            if net.embedding is not None:  # trained here: the serving router's table stays as it is
                net.embedding = copy.deepcopy(net.embedding)
            # every weight of net (its feature table a copy) on the texts' inputs
            logits_of = lambda rows: net(*_select(inputs, rows))  # noqa: E731
            loss = _fit_minibatches(
                net.parameters(), logits_of, net, labels, weight, epochs, lr, label_smoothing, gen, fused=True
            )
        elif method == "head":
            vectors = text_vectors(router.net, inputs)
            # the norm, hidden and output layers; the feature table stays frozen
            params = [p for name, p in net.named_parameters() if not name.startswith("embedding.")]
            logits_of = lambda rows: net.mlp(net.norm(vectors[rows]))  # noqa: E731
            loss = _fit_minibatches(params, logits_of, net, labels, weight, epochs, lr, label_smoothing, gen)
        else:
            vectors = text_vectors(router.net, inputs)
            loss = _fit_row(net, row, vectors, labels, weight, epochs, lr, label_smoothing)
        with torch.no_grad():
            fitted = (net(*new_inputs).argmax(dim=1) == row).float().mean().item()
        own = torch.randperm(len(texts), generator=gen)[:REPLAY_PER_CLASS]
        replay = _as_replay(
            _concat(kept, _select(new_inputs, own)),
            torch.cat([old_labels[old_labels != row], new_label[own]]),
        )
    warnings = []
    if len(texts) < MIN_TEXTS_PER_TASK:
        warnings.append(
            f"task {name!r} was added from {len(texts)} texts (give at least {MIN_TEXTS_PER_TASK})"
        )
    if fitted < 0.9:
        warnings.append(f"only {fitted:.0%} of task {name!r}'s own texts score it highest")
    report = {k: v for k, v in router.report.items() if k != "served"}
    entry = {
        "task": name,
        "adapter": adapter,
        "method": method,
        "texts": len(texts),
        "own_texts_top": fitted,
        "loss": loss,
        "seconds": round(time.perf_counter() - start, 3),
        "warnings": warnings,
    }
    report["updates"] = [*router.report.get("updates", []), entry]
    grown = type(router)(
        classes,
        router.features,
        router.mlp_config,
        report=report,
        encoder=router._encoder,
        adapters=mapping,
        base_threshold=router.base_threshold,
        net=net,
    )
    grown.replay = replay
    return grown


def without_adapter(router, adapter: str):
    """The router with ``adapter``'s classes turned background (their texts go to the base model), or
    None when it was the last adapter (nothing left to route to). KeyError when it does not route to
    ``adapter``. The net is shared: nothing is retrained."""
    if adapter not in router.names:
        raise KeyError(f"the router does not route to {adapter!r} (it routes to {router.names})")
    mapping = {c: (None if a == adapter else a) for c, a in router.adapter_of.items()}
    if all(a is None for a in mapping.values()):
        return None
    return router.with_adapters(mapping)
