"""Training the sentence router: argument checks, stratified split, AdamW with early stopping, the report.

:func:`train_router` is what :meth:`Router.train <dlplora_triton.routing.Router.train>` runs; the
choices behind its defaults are in docs/routing.md ("Training").
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..defaults import (
    CROP_MAX_UNITS,
    MIN_TEXTS_PER_TASK,
    ROUTER_MIN_ADAPTER_ACCURACY,
    ROUTER_MIN_BACKGROUND_TO_BASE,
    ROUTER_MIN_HELDOUT_ACCURACY,
    SHAPE_NGRAMS,
    SHORT_CROPS_PER_TEXT,
)
from .augment import short_crops as make_short_crops
from .features import featurize, pooled_hidden_states
from .net import (
    BASE_THRESHOLD,
    GENERAL,
    check_number,
    check_texts,
    gather_bags,
    one_thread,
    resolve_adapters,
    weighted_loss,
)
from .update import replay_sample

__all__ = ["train_router", "format_report", "format_warnings", "general_prompts", "GENERAL_PROMPTS"]

GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "general_prompts.jsonl"


def general_prompts() -> list[str]:
    """The package's general chat prompts (dlplora_triton/data/general_prompts.jsonl, written by hand:
    greetings, small talk, trivia, requests, in 20 languages): ``Router.train``'s default background."""
    from ..readers import read_labelled_jsonl

    texts, _ = read_labelled_jsonl(GENERAL_PROMPTS, label_key="lang", owner="the package's general prompts")
    return texts


def train_router(
    texts: Sequence[str],
    tasks: Sequence[str],
    *,
    router_cls: type,
    adapters=None,
    background: str | Sequence[str] | None = "builtin",
    base_threshold: float = BASE_THRESHOLD,
    features: str = "hash",
    num_buckets: int = 2**18,
    embed_dim: int = 16,
    char_ngrams: tuple[int, int] = (2, 4),
    word_ngrams: int = 2,
    max_chars: int = 2048,
    shape_ngrams: tuple[int, int] | None = SHAPE_NGRAMS,
    short_crops: int = SHORT_CROPS_PER_TEXT,
    crop_max_units: int = CROP_MAX_UNITS,
    model=None,
    tokenizer=None,
    max_length: int = 256,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.1,
    heldout: float = 0.1,
    epochs: int = 30,
    patience: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.1,
    balance: str = "weight",
    seed: int = 0,
    verbose: bool = False,
):
    """Train a router on labelled texts (what ``Router.train`` does); returns it with ``report`` filled in.

    Args:
        router_cls: the class to build, :class:`~dlplora_triton.routing.Router` or a subclass
            (``Router.train`` passes its own class: :mod:`.router` imports this module, not the reverse).
        texts, tasks: lists of str of equal length; each text is labelled with its task name. At
            least two distinct tasks; no empty or blank text. Every task is a class of the net.
        adapters: which tasks an adapter serves: ``None`` (default) every task; a list of task names
            (the other tasks become background: their texts go to the base model); or a dict
            ``{task: adapter name or None}`` (several tasks may map to one adapter). Training does not
            depend on it: ``train(..., adapters=a)`` equals ``train(...).with_adapters(a)``.
        background: texts added as the background class ``GENERAL`` ("none of these"): ``"builtin"``
            (default) the package's general chat prompts (:func:`general_prompts`); a list of str your
            own; ``None`` none (then only tasks left out of ``adapters`` are background, and with
            neither the router never abstains).
        base_threshold: in (0, 1]; a text whose background probability is at least this is served by
            the base model (saved with the router; ``route`` can override it per call).
        features: ``"hash"`` (default): hashed word 1-2-grams and character n-grams, nothing to
            download, any language; ``"model"``: mean-pooled last hidden states of ``model``
            (a transformers model, with its ``tokenizer``), texts cut to ``max_length`` tokens.
        num_buckets, embed_dim: the hashed feature table (default 2^18 x 16: 4.2M of the ~4.3M
            parameters). char_ngrams: (min, max) character n-gram lengths of the lower-cased text
            padded with spaces (word boundaries); word_ngrams: word n-grams up to this length
            (1: unigrams, 0: none); max_chars: a text is cut to this many characters before hashing.
        shape_ngrams: (min, max) character n-gram lengths of the text's shape (letters replaced by
            their script, digits by ``0``, runs collapsed: ``def fib(n):`` is ``a a(a):``;
            :func:`~dlplora_triton.routing.features.text_shape`), or None for none.
        short_crops, crop_max_units: each training text (not the held-out ones) adds ``short_crops``
            crops of 1 to ``crop_max_units`` words (a CJK character counts as one) with its label, so
            that prompts of a few words route as well as sentences (:mod:`.augment`; docs/routing.md,
            "Short prompts"); 0 adds none.
        hidden, dropout: the MLP's hidden widths and dropout.
        heldout: the fraction of each task held out (stratified) for early stopping and the report.
        epochs, patience: at most ``epochs`` passes; stop after ``patience`` epochs without a better
            held-out (accuracy, then loss); the best epoch's weights are kept.
        batch_size, lr, weight_decay: AdamW's settings.
        label_smoothing: of the cross-entropy; keeps probabilities off 0 and 1 so top-p can mix
            (docs/routing.md).
        balance: ``"weight"`` (loss weighted by inverse task frequency) or ``"sample"`` (batches
            drawn with probability inverse to task frequency).
        seed: the same data and seed give the same router, bit for bit.
        verbose: show a tqdm progress bar and print the report at the end.

    ``report["warnings"]`` lists what says the router may route badly (empty when nothing does): tasks
    with fewer than ``MIN_TEXTS_PER_TASK`` (50) texts, held-out accuracy below 90%, fewer than 85% of
    the held-out adapter-task texts reaching their adapter, fewer than 85% of the held-out background
    texts going to the base model (docs/routing.md, "How much data"); :func:`format_warnings` words it
    as one line. It is saved with the router.
    """
    texts = check_texts(texts)
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of str, got {type(tasks).__name__}")
    tasks = list(tasks)
    if len(texts) != len(tasks):
        raise ValueError(
            f"texts and tasks must have the same length, got {len(texts)} texts and {len(tasks)} tasks"
        )
    for i, t in enumerate(tasks):
        if not isinstance(t, str) or not t:
            raise ValueError(f"tasks[{i}] must be a non-empty str, got {t!r}")
    if len(set(tasks)) < 2:
        raise ValueError(f"training needs at least two distinct tasks, got {sorted(set(tasks))}")
    texts_per_task = dict(sorted(Counter(tasks).items()))  # the caller's tasks, before the background
    if isinstance(background, str):
        if background != "builtin":
            raise ValueError(f"background must be 'builtin', a list of str or None, got {background!r}")
        background = general_prompts()
    elif background is not None:
        background = check_texts(background, "background")
    if background:
        texts, tasks = texts + list(background), tasks + [GENERAL] * len(background)
    names = sorted(set(tasks))  # the classes: the net's columns
    resolve_adapters(names, adapters)  # a bad mapping fails before any work
    check_number("base_threshold", base_threshold, 0, 1, low_open=True)
    if features not in ("hash", "model"):
        raise ValueError(f"features must be 'hash' or 'model', got {features!r}")
    if features == "model" and (model is None or tokenizer is None):
        raise ValueError("features='model' needs model= (a transformers model) and tokenizer=")
    if not (
        isinstance(char_ngrams, Sequence) and len(char_ngrams) == 2 and 1 <= char_ngrams[0] <= char_ngrams[1]
    ):
        raise ValueError(f"char_ngrams must be (min, max) with 1 <= min <= max, got {char_ngrams!r}")
    if shape_ngrams is not None and not (
        isinstance(shape_ngrams, Sequence)
        and len(shape_ngrams) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in shape_ngrams)
        and 1 <= shape_ngrams[0] <= shape_ngrams[1]
    ):
        raise ValueError(
            f"shape_ngrams must be None or (min, max) with 1 <= min <= max, got {shape_ngrams!r}"
        )
    for name, value, low in (
        ("num_buckets", num_buckets, 1),
        ("embed_dim", embed_dim, 1),
        ("word_ngrams", word_ngrams, 0),
        ("max_chars", max_chars, 1),
        ("short_crops", short_crops, 0),
        ("crop_max_units", crop_max_units, 1),
        ("max_length", max_length, 1),
        ("epochs", epochs, 1),
        ("patience", patience, 1),
        ("batch_size", batch_size, 1),
    ):
        check_number(name, value, low, 2**62, integer=True)
    if isinstance(hidden, (str, int)) or any(
        isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
    ):
        raise ValueError(f"hidden must list positive integer widths (empty: a linear layer), got {hidden!r}")
    check_number("dropout", dropout, 0, 1, high_open=True)
    check_number("heldout", heldout, 0, 1, low_open=True, high_open=True)
    check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
    check_number("lr", lr, 0, math.inf, low_open=True, high_open=True)
    check_number("weight_decay", weight_decay, 0, math.inf, high_open=True)
    if balance not in ("weight", "sample"):
        raise ValueError(f"balance must be 'weight' or 'sample', got {balance!r}")

    start_time = time.perf_counter()
    index_of = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index_of[t] for t in tasks], dtype=torch.int64)
    # The split draws from its own generator (the epochs' order continues from it); crops are cut from
    # the training texts only, so the held-out figures stay those of whole texts.
    gen = torch.Generator().manual_seed(seed)
    train_rows, held_rows = _stratified_split(labels, heldout, gen)
    num_texts = len(texts)
    if short_crops:
        crops, sources = make_short_crops(
            [texts[i] for i in train_rows.tolist()], short_crops, crop_max_units, seed
        )
        texts = texts + crops
        labels = torch.cat([labels, labels[train_rows[torch.tensor(sources, dtype=torch.int64)]]])
        train_rows = torch.cat([train_rows, torch.arange(num_texts, num_texts + len(crops))])
    mlp = {"hidden": list(hidden), "dropout": dropout}
    if features == "hash":
        config = {
            "source": "hash",
            "num_buckets": num_buckets,
            "embed_dim": embed_dim,
            "char_ngrams": list(char_ngrams),
            "word_ngrams": word_ngrams,
            "max_chars": max_chars,
        }
        if shape_ngrams is not None:
            config["shape_ngrams"] = list(shape_ngrams)
        indices, offsets = featurize(texts, config)
        take = lambda rows: gather_bags(indices, offsets, rows)  # noqa: E731
        encoder = None
    else:
        vectors = pooled_hidden_states(texts, model, tokenizer, max_length)  # frozen: computed once
        config = {
            "source": "model",
            "hidden_size": vectors.shape[1],
            "max_length": max_length,
            "model_name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        }
        take = lambda rows: (vectors[rows],)  # noqa: E731
        encoder = (model, tokenizer)

    # fork_rng: training draws from the global RNG (init, dropout) under our seed, and leaves the
    # caller's RNG state as it was.
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = router_cls(
            names, config, mlp, encoder=encoder, adapters=adapters, base_threshold=base_threshold
        )
        history, best_epoch = _fit(
            router.net,
            take,
            labels,
            train_rows,
            held_rows,
            len(names),
            gen,
            epochs=epochs,
            patience=patience,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            balance=balance,
            verbose=verbose,
        )
        held_loss, held_acc, predicted = _evaluate(router.net, take(held_rows), labels[held_rows])
        served = _served(router, take(held_rows), labels[held_rows])
        router.replay = replay_sample(take, labels, train_rows, seed, index_of.get(GENERAL))  # for add_task

    router.report = _report(
        names,
        labels[held_rows],
        predicted,
        held_loss,
        held_acc,
        train_seconds=round(time.perf_counter() - start_time, 3),
        epochs_run=len(history),
        best_epoch=best_epoch,
        num_train=len(train_rows),
        num_crops=len(texts) - num_texts,
        num_heldout=len(held_rows),
        num_parameters=router.num_parameters,
        served=served,
        history=history,
    )
    router.report["warnings"] = _quality_warnings(router.report, texts_per_task)
    if verbose:
        print(format_report(router.report))
    return router


def _stratified_split(
    labels: torch.Tensor, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out): about ``fraction`` of every task held out, at least one of a task
    with two or more texts, never its last one."""
    train, held = [], []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_held = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:n_held])
        train.append(members[n_held:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


@torch.no_grad()
def _evaluate(net, inputs, labels) -> tuple[float | None, float | None, torch.Tensor]:
    """(mean cross-entropy, accuracy, predictions) of ``net`` on prepared inputs; None without texts."""
    net.eval()
    if labels.numel() == 0:
        return None, None, labels
    logits = net(*inputs)
    predicted = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels).item(), (predicted == labels).double().mean().item(), predicted


def _fit(
    net,
    take,
    labels,
    train_rows,
    held_rows,
    num_tasks,
    gen,
    *,
    epochs,
    patience,
    batch_size,
    lr,
    weight_decay,
    label_smoothing,
    balance,
    verbose,
) -> tuple[list[dict], int]:
    """AdamW epochs with early stopping on the held-out rows; leaves the best epoch's weights in ``net``.

    ``take(rows)`` gives the net's inputs for a set of texts. Returns (per-epoch history, best epoch).
    Without held-out rows (every task has one text) it runs all ``epochs`` and keeps the last.
    """
    counts = torch.bincount(labels[train_rows], minlength=num_tasks).clamp(min=1).double()
    inverse = (counts.sum() / (num_tasks * counts)).float()  # per-task weight; all 1 for a balanced set
    loss_weight = inverse if balance == "weight" else None
    held_x, held_y = take(held_rows), labels[held_rows]
    # fused: one kernel per step instead of ~10 passes over the 4M-row table (20x faster on CPU).
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    best, best_key, best_epoch, stale, history = None, None, 0, 0, []
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="training router", unit="epoch")
    try:
        for epoch in range(1, epochs + 1):
            net.train()
            if balance == "sample":
                order = train_rows[
                    torch.multinomial(inverse[labels[train_rows]], len(train_rows), True, generator=gen)
                ]
            else:
                order = train_rows[torch.randperm(len(train_rows), generator=gen)]
            total = 0.0
            for rows in torch.split(order, batch_size):
                logits = net(*take(rows))
                loss = weighted_loss(logits, labels[rows], loss_weight, label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            held_loss, held_acc, _ = _evaluate(net, held_x, held_y)
            train_loss = total / len(train_rows)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "heldout_loss": held_loss,
                    "heldout_accuracy": held_acc,
                }
            )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{train_loss:.4f}", heldout_acc="n/a" if held_acc is None else f"{held_acc:.4f}"
                )
                bar.update(1)
            if held_acc is None:
                continue
            key = (held_acc, -held_loss)  # accuracy first; among equal accuracies the lower loss
            if best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch, 0
                best = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    finally:
        if bar is not None:
            bar.close()
    if best is None:
        return history, len(history)
    net.load_state_dict(best)
    net.eval()
    return history, best_epoch


@torch.no_grad()
def _served(router, inputs, labels: torch.Tensor) -> dict:
    """How the held-out texts are served at the router's base threshold: the fraction of texts of
    adapter-served classes whose top adapter is theirs and that the base model does not take, and the
    fraction of background texts the base model takes."""
    if labels.numel() == 0:
        return {"base_threshold": router.base_threshold, "adapter_accuracy": None, "base_rate": None}
    router.net.eval()
    logits = router.net(*inputs).float()
    to_base = router._base_probs(logits) >= router.base_threshold
    top = router._adapter_probs(logits).argmax(dim=1).tolist()
    adapter_hits, background_hits = [], []
    for label, base, j in zip(labels.tolist(), to_base.tolist(), top):
        want = router.adapter_of[router.classes[label]]
        if want is None:
            background_hits.append(base)
        else:
            adapter_hits.append(not base and router.names[j] == want)
    rate = lambda hits: sum(hits) / len(hits) if hits else None  # noqa: E731
    return {
        "base_threshold": router.base_threshold,
        "adapter_accuracy": rate(adapter_hits),
        "adapter_texts": len(adapter_hits),
        "base_rate": rate(background_hits),
        "background_texts": len(background_hits),
    }


def _report(names, truth, predicted, loss, accuracy, **extra) -> dict:
    """The training report: held-out accuracy and loss, per-task accuracy, the 5 most confused pairs."""
    num = len(names)
    confusion = torch.zeros(num, num, dtype=torch.int64)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    per_task = {}
    for i, name in enumerate(names):
        n = int(confusion[i].sum())
        per_task[name] = {"accuracy": (int(confusion[i, i]) / n) if n else None, "count": n}
    off = confusion.clone()
    off.fill_diagonal_(0)
    pairs = []
    for flat in torch.argsort(off.flatten(), descending=True, stable=True)[:5].tolist():
        t, q = divmod(flat, num)
        if off[t, q] > 0:
            rate = int(off[t, q]) / int(confusion[t].sum())
            pairs.append({"true": names[t], "predicted": names[q], "count": int(off[t, q]), "rate": rate})
    return {
        "heldout_accuracy": accuracy,
        "heldout_loss": loss,
        "per_task": per_task,
        "confused_pairs": pairs,
        **extra,
    }


def _quality_warnings(report: dict, texts_per_task: dict[str, int]) -> list[str]:
    """What in the data or the held-out figures says the router may route badly (thresholds and their
    measurement: dlplora_triton/defaults.py, docs/routing.md "How much data"); empty when nothing does."""
    problems = []
    few = {t: n for t, n in texts_per_task.items() if n < MIN_TEXTS_PER_TASK}
    if few:
        listed = ", ".join(
            f"{t} {n}" for t, n in sorted(few.items(), key=lambda item: (item[1], item[0]))[:6]
        )
        more = f" and {len(few) - 6} more" if len(few) > 6 else ""
        problems.append(
            f"{len(few)} of {len(texts_per_task)} tasks have fewer than {MIN_TEXTS_PER_TASK} texts "
            f"({listed}{more})"
        )
    accuracy = report.get("heldout_accuracy")
    if accuracy is not None and accuracy < ROUTER_MIN_HELDOUT_ACCURACY:
        problems.append(f"held-out accuracy {accuracy:.1%} (want >= {ROUTER_MIN_HELDOUT_ACCURACY:.0%})")
    served = report.get("served") or {}
    adapter = served.get("adapter_accuracy")
    if adapter is not None and adapter < ROUTER_MIN_ADAPTER_ACCURACY:
        problems.append(
            f"{adapter:.1%} of {served['adapter_texts']} held-out adapter-task texts reach their adapter "
            f"(want >= {ROUTER_MIN_ADAPTER_ACCURACY:.0%})"
        )
    base = served.get("base_rate")
    if base is not None and base < ROUTER_MIN_BACKGROUND_TO_BASE:
        problems.append(
            f"{base:.1%} of {served['background_texts']} held-out background texts go to the base model "
            f"(want >= {ROUTER_MIN_BACKGROUND_TO_BASE:.0%})"
        )
    return problems


def format_warnings(report: dict) -> str | None:
    """The report's ``warnings`` as one line (what ``dlplora train-router`` prints on stderr), or None."""
    problems = report.get("warnings") or []
    if not problems:
        return None
    return (
        f"this router may route badly: {'; '.join(problems)}. Give every task at least "
        f"{MIN_TEXTS_PER_TASK} texts (docs/routing.md, 'How much data')"
    )


def format_report(report: dict) -> str:
    """The training report as text (what ``Router.train(verbose=True)`` and ``dlplora train-router`` print)."""
    if not report:
        return "no training report"
    accuracy = report["heldout_accuracy"]
    lines = [
        f"held-out accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'} on {report.get('num_heldout', '?')} texts "
        f"(trained on {report.get('num_train', '?')}; {report.get('epochs_run', '?')} epochs, best "
        f"{report.get('best_epoch', '?')}; {report.get('train_seconds', 0):.1f} s; "
        f"{report.get('num_parameters', 0):,} parameters)",
        "per task:",
    ]
    for name, row in report["per_task"].items():
        acc = "   n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"  {name:20s} {acc}  ({row['count']} held out)")
    pairs = report["confused_pairs"]
    confused = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']}, {p['rate']:.1%})" for p in pairs)
    lines.append("most confused: " + (confused or "none"))
    served = report.get("served")
    if served and served.get("adapter_accuracy") is not None:
        base = served.get("base_rate")
        lines.append(
            f"served at base_threshold {served['base_threshold']}: {served['adapter_accuracy']:.4f} of "
            f"{served['adapter_texts']} adapter-task texts to their adapter, "
            + (
                f"{base:.4f} of {served['background_texts']} background texts to the base model"
                if base is not None
                else "no background texts held out"
            )
        )
    return "\n".join(lines)
