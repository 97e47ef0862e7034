"""A saved sentence router: a folder holding ``router_config.json`` and ``router.safetensors``.

    router_config.json    {"format": "dlplora-router", "format_version": 2, "names", "classes",
                          "adapter_of", "base_threshold", "features", "mlp", "report"}
    router.safetensors    the :class:`~.net.RouterNet` state_dict (float32)
    router_replay.safetensors  optional: the replay sample ``Router.add_task`` fits against: "labels"
                          [N] int64 class ids, and the texts' bucket ids ("indices" [F] int32,
                          "offsets" [N] int64) or their vectors ("vectors" [N, width] float32);
                          older readers ignore it, and a router without it loads with ``replay`` None

:meth:`Router.save <dlplora_triton.routing.Router.save>` and :meth:`Router.load
<dlplora_triton.routing.Router.load>` run :func:`save_router` and :func:`load_router`. Reading checks
every config field and the weights' shapes before anything is built, and raises FileNotFoundError /
ValueError naming the file. Format version 1 (before abstention) is still read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..readers import read_json_object, read_safetensors
from .net import BASE_THRESHOLD, GENERAL, RouterNet, net_inputs
from .update import REPLAY_FILE

__all__ = ["FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "save_router", "load_router"]

FORMAT_VERSION = 2  # 2: classes, adapter_of, base_threshold (abstention); 1 is still read
CONFIG_FILE = "router_config.json"
WEIGHTS_FILE = "router.safetensors"
_FORMAT_NAME = "dlplora-router"


def save_router(router, directory: str | os.PathLike) -> Path:
    """Write ``router`` (a :class:`~dlplora_triton.routing.Router`) into ``directory``: what
    :meth:`Router.save <dlplora_triton.routing.Router.save>` does (and says)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save the router to {str(directory)!r}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "names": router.names,
        "classes": router.classes,
        "adapter_of": router.adapter_of,
        "base_threshold": router.base_threshold,
        "features": router.features,
        "mlp": router.mlp_config,
        "report": router.report,
    }
    # Write next to the target, then rename: a crash never leaves a half-written file behind.
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in router.net.state_dict().items()},
        str(tmp),
        metadata={"format": _FORMAT_NAME},
    )
    os.replace(tmp, directory / WEIGHTS_FILE)
    replay = getattr(router, "replay", None)
    if replay is not None:
        tmp = directory / (REPLAY_FILE + ".tmp")
        tensors = {key: value.contiguous() for key, value in replay.items()}
        indices = tensors.get("indices")
        if indices is not None and (not indices.numel() or int(indices.max()) < 2**31):
            tensors["indices"] = indices.to(torch.int32)  # half the bytes; read back as int64
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / REPLAY_FILE)
    elif (directory / REPLAY_FILE).exists():  # a previous router's sample would not match this one
        (directory / REPLAY_FILE).unlink()
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_router(cls, directory: str | os.PathLike, model=None, tokenizer=None):
    """``cls`` (:class:`~dlplora_triton.routing.Router` or a subclass) built from the router saved in
    ``directory``, every field and tensor checked first: what :meth:`Router.load
    <dlplora_triton.routing.Router.load>` does (and says)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"router {str(directory)!r} is a file; a saved router is a folder holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (what train-router --out and Router.save write)"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"router directory {str(directory)!r} does not exist")
    owner = f"router at {str(directory)!r}"
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found: {directory} is not a saved router")
    classes, adapter_of, threshold, features, mlp, report = _parse_config(
        read_json_object(config_path, owner), config_path
    )
    encoder = None
    if features["source"] == "model":
        if model is None or tokenizer is None:
            raise ValueError(
                f"{directory} routes on the hidden states of a transformers model "
                f"({features.get('model_name') or 'unnamed'}): pass model= and tokenizer= to Router.load"
            )
        encoder = (model, tokenizer)
    state = read_safetensors(weights_path, owner)
    expected = RouterNet.state_shapes(len(classes), mlp["hidden"], net_inputs(features))
    got = {k: list(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ValueError(
            f"{owner}: {weights_path} does not match {config_path} ({len(classes)} classes, features and mlp): "
            + ", ".join(f"{k}: file {got.get(k)}, config {expected.get(k)}" for k in wrong[:4])
        )
    for key, tensor in state.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{owner}: {weights_path}: tensor {key!r} is not finite floating point")
    with torch.random.fork_rng(devices=[]):  # building the net draws initial weights: not the caller's RNG
        router = cls(
            classes,
            features,
            mlp,
            report=report,
            encoder=encoder,
            adapters=adapter_of,
            base_threshold=threshold,
        )
    router.net.load_state_dict(state)
    if (directory / REPLAY_FILE).exists():
        router.replay = _read_replay(directory / REPLAY_FILE, owner, len(classes), features, expected)
    return router


def _read_replay(path: Path, owner: str, num_classes: int, features: dict, shapes: dict) -> dict:
    """The replay sample of ``path``, checked against the router's inputs and class count."""
    tensors = read_safetensors(path, owner)
    labels = tensors.get("labels")
    ok = isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.dim() == 1
    ok = ok and (not labels.numel() or (int(labels.min()) >= 0 and int(labels.max()) < num_classes))
    if features["source"] == "hash":
        want = "'indices' [F] int32 bucket ids, 'offsets' [N] int64"
        indices, offsets = tensors.get("indices"), tensors.get("offsets")
        ok = ok and set(tensors) == {"labels", "indices", "offsets"}
        ok = ok and indices.dtype in (torch.int32, torch.int64) and indices.dim() == 1
        ok = ok and offsets.dtype == torch.int64 and offsets.shape == labels.shape
        ok = ok and (
            not indices.numel() or (int(indices.min()) >= 0 and int(indices.max()) < features["num_buckets"])
        )
        ok = ok and (not offsets.numel() or (int(offsets[0]) == 0 and bool((offsets.diff() >= 0).all())))
        ok = ok and (not offsets.numel() or int(offsets[-1]) <= indices.numel())
        replay = {"indices": indices.long(), "offsets": offsets, "labels": labels} if ok else None
    else:
        width = shapes["norm.weight"][0]
        want = f"'vectors' [N, {width}] float32"
        vectors = tensors.get("vectors")
        ok = ok and set(tensors) == {"labels", "vectors"} and vectors.dtype == torch.float32
        ok = ok and vectors.dim() == 2 and vectors.shape == (labels.shape[0], width)
        ok = ok and bool(torch.isfinite(vectors).all())
        replay = {"vectors": vectors, "labels": labels} if ok else None
    if replay is None:
        raise ValueError(
            f"{owner}: {str(path)!r} is not a replay sample of this router (want {want} and 'labels' [N] "
            f"int64 class ids below {num_classes}); delete it to load the router without one"
        )
    return replay


def _parse_config(config: dict, path: Path) -> tuple[list[str], dict, float, dict, dict, dict]:
    """``(classes, adapter_of, base_threshold, features, mlp, report)`` of a saved router's config,
    every field checked. Format version 1 (no background) is read as every name its own adapter."""
    where = f"router config {str(path)!r}"
    if config.get("format") != _FORMAT_NAME:
        raise ValueError(f"{where} is not a dlplora router config (no 'format': '{_FORMAT_NAME}')")
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{where} has format_version {version!r}; this version of "
            f"dlplora_triton reads format_version 1 and {FORMAT_VERSION}"
        )

    def fail(field: str, value, expected: str):
        raise ValueError(f"{where} is missing or has a malformed field: {field} = {value!r} ({expected})")

    names = config.get("names")
    if (
        not isinstance(names, list)
        or len(names) < (2 if version == 1 else 1)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        fail("names", names, "distinct non-empty adapter names, at least two in format_version 1")
    if version == 1:
        classes, adapter_of, threshold = names, {n: n for n in names}, BASE_THRESHOLD
    else:
        classes, adapter_of, threshold = (
            config.get("classes"),
            config.get("adapter_of"),
            config.get("base_threshold"),
        )
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            fail("classes", classes, "at least two distinct non-empty class names")
        if not (
            isinstance(adapter_of, dict)
            and set(adapter_of) == set(classes)
            and all(a is None or (isinstance(a, str) and a) for a in adapter_of.values())
        ):
            fail("adapter_of", adapter_of, "an object mapping every class to an adapter name or null")
        if adapter_of.get(GENERAL) is not None:
            fail("adapter_of", adapter_of, f"{GENERAL!r} must map to null")
        if sorted({a for a in adapter_of.values() if a is not None}) != sorted(names):
            fail("names", names, "the adapter names of adapter_of, sorted")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or not 0 < threshold <= 1
        ):
            fail("base_threshold", threshold, "a number in (0, 1]")
    features, mlp, report = config.get("features"), config.get("mlp"), config.get("report") or {}
    if not isinstance(features, dict):
        fail("features", features, "an object")
    features = dict(features)
    features.setdefault("source", "hash")
    if features["source"] == "hash":
        ints = {"num_buckets": 1, "embed_dim": 1, "word_ngrams": 0, "max_chars": 1}
        char = features.get("char_ngrams")
        if not (
            isinstance(char, list)
            and len(char) == 2
            and all(_is_int(c) for c in char)
            and 1 <= char[0] <= char[1]
        ):
            fail("features.char_ngrams", char, "[min, max] with 1 <= min <= max")
        shape = features.get("shape_ngrams")  # absent in routers saved before shape features
        if shape is not None and not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(_is_int(c) for c in shape)
            and 1 <= shape[0] <= shape[1]
        ):
            fail("features.shape_ngrams", shape, "null or [min, max] with 1 <= min <= max")
    elif features["source"] == "model":
        ints = {"hidden_size": 1, "max_length": 1}
    else:
        fail("features.source", features["source"], "'hash' or 'model'")
    for key, low in ints.items():
        if not (_is_int(features.get(key)) and features[key] >= low):
            fail(f"features.{key}", features.get(key), f"an integer >= {low}")
    if not isinstance(mlp, dict):
        fail("mlp", mlp, "an object")
    hidden, dropout = mlp.get("hidden"), mlp.get("dropout")
    if not (isinstance(hidden, list) and all(_is_int(h) and h >= 1 for h in hidden)):
        fail("mlp.hidden", hidden, "a list of positive integers")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        fail("mlp.dropout", dropout, "a number in [0, 1)")
    if not isinstance(report, dict):
        fail("report", report, "an object")
    return (
        classes,
        adapter_of,
        float(threshold),
        features,
        {"hidden": hidden, "dropout": float(dropout)},
        report,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
