"""Reading PEFT LoRA adapter directories and checking them against a model.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. The tensor
names say which modules are adapted (``base_model.model.<module path>.lora_A.weight`` ``[r, K]`` and
``...lora_B.weight`` ``[N, r]``); the config says how each is scaled and must agree with them:

- ``target_modules`` (list: exact name or ``.<name>`` suffix; str: full-match regex), narrowed by
  ``layers_to_transform`` / ``layers_pattern`` and ``exclude_modules``, matched as PEFT matches them;
- rank ``r`` and ``lora_alpha``, per module overridden by ``rank_pattern`` / ``alpha_pattern``
  (keys match a ``.``-separated suffix of the module path, like PEFT's ``get_pattern_key``);
- scale ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``;
- ``fan_in_fan_out`` only says how the base weight is stored (GPT-2's ``Conv1D``: ``[K, N]``); PEFT
  keeps ``lora_A`` / ``lora_B`` in ``nn.Linear`` layout either way, so it changes no tensor here.

Everything is checked before anything is returned (files through :mod:`dlplora_triton.readers`, tensors
for shape, dtype, pairing and finiteness; each error names the adapter and the file), so callers can
validate all adapters first and only then change a model. Nothing here imports peft.

:func:`check_adapter_dir` is the cheaper check a server makes before it serves a directory (config,
rank, the safetensors header; values on request), remembered per directory until a file changes.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import linear_features, matches_target
from .readers import read_json_object, read_safetensors

__all__ = [
    "AdapterInfo",
    "ModuleLoRA",
    "LoadedAdapter",
    "read_adapter_config",
    "load_adapter",
    "check_adapter_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # never unpickled: it could run code
_PEFT_PREFIX = "base_model.model."

# Config fields that change the forward math beyond plain LoRA: (field, what to call it in errors).
# A field counts as set when it is truthy (non-empty list/dict, True, a sub-config).
_UNSUPPORTED_FIELDS = (
    ("use_dora", "DoRA (use_dora=True)"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("lora_bias", "LoRA bias (lora_bias=True)"),
    ("target_parameters", "target_parameters (LoRA on raw nn.Parameters)"),
    ("layer_replication", "layer_replication"),
    ("trainable_token_indices", "trainable_token_indices (trainable token embeddings)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("use_qalora", "QA-LoRA (use_qalora=True)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("megatron_config", "Megatron parallel layers (megatron_config)"),
)


@dataclass(frozen=True)
class AdapterInfo:
    """What was read from one adapter directory (no tensors)."""

    name: str
    path: str
    rank: int  # the config's r (modules may differ through rank_pattern: see module_ranks)
    alpha: float  # the config's lora_alpha (modules may differ through alpha_pattern)
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str  # as written in the config
    targets: tuple[str, ...]  # module paths in the model this adapter adapts, sorted
    module_ranks: dict[str, int] = field(repr=False)  # module path -> rank
    module_scales: dict[str, float] = field(repr=False)  # module path -> alpha / r (or / sqrt(r))

    @property
    def targets_summary(self) -> str:
        """Short names of the adapted modules (last path component), e.g. ``'q_proj,v_proj'``."""
        return ",".join(sorted({t.rsplit(".", 1)[-1] for t in self.targets}))


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted module of one adapter: ``delta(x) = scale * (x A^T) B^T``."""

    lora_a: torch.Tensor  # [r, K]
    lora_b: torch.Tensor  # [N, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoadedAdapter:
    """A validated adapter: its info and its weights per module path."""

    info: AdapterInfo
    modules: dict[str, ModuleLoRA] = field(repr=False)


def read_adapter_config(path: str | os.PathLike, name: str | None = None) -> dict:
    """Read ``adapter_config.json`` of a PEFT adapter directory and reject unsupported features.

    Raises FileNotFoundError when the directory or its config is missing, ValueError (naming the
    adapter and the feature) for what plain multi-LoRA fusion cannot serve: DoRA, modules_to_save,
    a LoRA bias, a non-LoRA PEFT type, and the other fields listed in ``_UNSUPPORTED_FIELDS``.
    """
    label = f"adapter {name!r}" if name is not None else f"adapter at {os.fspath(path)!r}"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: no such directory: {path!r}")
    if not os.path.isdir(path):
        raise ValueError(f"{label}: {path!r} is not a directory (expected a PEFT adapter directory)")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{label}: no {CONFIG_NAME} in {path!r}")
    config = read_json_object(config_path, label)
    label = f"{label} ({config_path})"  # the field checks below name the file too

    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{label}: unsupported PEFT type {peft_type!r} (only LORA adapters are supported)")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{label}: unsupported feature: trained biases (bias={bias!r}; only 'none' is supported)"
        )
    for key, feature in _UNSUPPORTED_FIELDS:
        if config.get(key):
            raise ValueError(f"{label}: unsupported feature: {feature}")

    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{label}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_real(alpha):
        raise ValueError(f"{label}: lora_alpha must be a real number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{label}: target_modules {targets!r} is not a valid regex: {e}") from None
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise ValueError(
            f"{label}: target_modules must be a non-empty list of names or a regex string, got {targets!r}"
        )
    if isinstance(targets, str) and config.get("layers_to_transform") not in (None, []):
        raise ValueError(
            f"{label}: layers_to_transform cannot be used with a regex target_modules (as in PEFT)"
        )
    _check_layer_fields(label, config)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{label}: {key} must be a mapping, got {pattern!r}")
        for k, v in pattern.items():
            ok = (
                (isinstance(v, int) and not isinstance(v, bool) and v > 0)
                if key == "rank_pattern"
                else _is_real(v)
            )
            if not ok:
                raise ValueError(
                    f"{label}: {key}[{k!r}] = {v!r} is not a valid {'rank' if key == 'rank_pattern' else 'alpha'}"
                )
    return config


def _check_layer_fields(label: str, config: dict) -> None:
    """Types of the fields that narrow target_modules: layers_to_transform, layers_pattern, exclude_modules."""
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        _is_index(layers) or (isinstance(layers, list) and all(_is_index(i) for i in layers))
    ):
        raise ValueError(
            f"{label}: layers_to_transform must be an int >= 0 or a list of them, got {layers!r}"
        )
    for key in ("layers_pattern", "exclude_modules"):
        value = config.get(key)
        if (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            if key == "exclude_modules" and isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(
                        f"{label}: exclude_modules {value!r} is not a valid regex: {e}"
                    ) from None
            continue
        raise ValueError(f"{label}: {key} must be a string or a list of strings, got {value!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"{label}: {key} must be true or false, got {config[key]!r}")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _matches_target(config: dict, key: str) -> bool:
    """Whether PEFT would put this adapter on module ``key`` (:func:`dlplora_triton.modules.matches_target`)."""
    return matches_target(
        key,
        config["target_modules"],
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        exclude_modules=config.get("exclude_modules"),
    )


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern_key, value in pattern.items():
        if re.match(rf"(.*\.)?({pattern_key})$", key):
            return value
    return default


def _split_key(label: str, key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (module path, 'A' | 'B'); reject everything else."""
    if not key.startswith(_PEFT_PREFIX):
        raise ValueError(
            f"{label}: tensor {key!r} is not a PEFT LoRA weight (expected the prefix {_PEFT_PREFIX!r})"
        )
    rest = key[len(_PEFT_PREFIX) :]
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if rest.endswith(suffix):
            return rest[: -len(suffix)], part
    if ".lora_magnitude_vector" in rest:
        feature = "DoRA (lora_magnitude_vector tensors)"
    elif ".lora_embedding_" in rest:
        feature = "embedding targets (lora_embedding tensors; only nn.Linear and Conv1D are supported)"
    elif rest.endswith(".lora_B.bias"):
        feature = "LoRA bias (lora_B.bias tensors)"
    elif ".modules_to_save." in rest or ".lora_" not in rest:
        feature = "modules_to_save or trained base tensors"
    else:
        feature = "an unrecognised LoRA tensor"
    raise ValueError(f"{label}: unsupported feature: {feature}: tensor {key!r}")


def load_adapter(name: str, path: str | os.PathLike, modules: Mapping[str, nn.Module]) -> LoadedAdapter:
    """Read and validate one PEFT adapter directory against a model's modules.

    Args:
        name: the adapter's name (used in every error message).
        path: the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        modules: module path -> module of the model (e.g. ``dict(model.named_modules())``); adapted
            modules must be ``nn.Linear`` or GPT-2 ``Conv1D``.

    Returns a :class:`LoadedAdapter` whose weights are on the CPU in the file's dtype. Raises
    FileNotFoundError for a missing directory or file, ValueError naming the adapter and the problem
    for unsupported features, tensors whose shapes do not fit the model, modules the model does not
    have, and a config that does not agree with the tensors.
    """
    label = f"adapter {name!r}"
    config = read_adapter_config(path, name)
    path = os.fspath(path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise ValueError(
                f"{label}: unsupported feature: pickled weights (adapter_model.bin only); save the adapter "
                f"with safe_serialization=True to get {WEIGHTS_NAME}"
            )
        raise FileNotFoundError(f"{label}: no {WEIGHTS_NAME} in {path!r}")
    state = read_safetensors(weights_path, label)
    label = f"{label} ({weights_path})"  # the tensor checks below name the file too

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module_path, part = _split_key(label, key)
        factors.setdefault(module_path, {})[part] = tensor
    if not factors:
        raise ValueError(f"{label}: {weights_path!r} holds no LoRA weights")

    r, alpha, use_rslora = config["r"], config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    loaded: dict[str, ModuleLoRA] = {}
    for module_path in sorted(factors):
        parts = factors[module_path]
        for part in ("A", "B"):
            if part not in parts:
                raise ValueError(f"{label}: module {module_path!r} has no lora_{part}.weight tensor")
        module = modules.get(module_path)
        if module is None:
            raise ValueError(
                f"{label}: has weights for module {module_path!r}, which the model does not have"
            )
        features = linear_features(module)
        if features is None:
            raise ValueError(
                f"{label}: unsupported target {module_path!r} of type {type(module).__name__} "
                "(only nn.Linear and transformers' Conv1D with a floating-point weight are supported)"
            )
        if not _matches_target(config, module_path):
            raise ValueError(
                f"{label}: has weights for module {module_path!r}, which its target_modules "
                f"{config['target_modules']!r} (with layers_to_transform / exclude_modules) do not select"
            )
        in_features, out_features = features
        lora_a, lora_b = parts["A"], parts["B"]
        if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
            raise ValueError(
                f"{label}: module {module_path!r}: LoRA weights must be floating point, got {lora_a.dtype}, {lora_b.dtype}"
            )
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise ValueError(
                f"{label}: module {module_path!r}: lora_A / lora_B must be 2-D, got shapes "
                f"{list(lora_a.shape)} and {list(lora_b.shape)} (conv targets are not supported)"
            )
        rank = lora_a.shape[0]
        if rank == 0:
            raise ValueError(
                f"{label}: module {module_path!r} has lora_A of rank 0 (shape {list(lora_a.shape)})"
            )
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_b.shape[1] != rank:
            raise ValueError(
                f"{label}: module {module_path!r} does not fit the model: lora_A {list(lora_a.shape)} and "
                f"lora_B {list(lora_b.shape)}, expected [r, {in_features}] and [{out_features}, r]"
            )
        expected_rank = _pattern_value(rank_pattern, module_path, r)
        if rank != expected_rank:
            raise ValueError(
                f"{label}: module {module_path!r} has rank {rank} but the config says {expected_rank} (r / rank_pattern)"
            )
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            raise ValueError(f"{label}: module {module_path!r} has NaN or infinite values in lora_A / lora_B")
        module_alpha = _pattern_value(alpha_pattern, module_path, alpha)
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        loaded[module_path] = ModuleLoRA(lora_a, lora_b, float(scale))

    if config["target_modules"] != "all-linear":
        missing = [
            p
            for p, m in modules.items()
            if p not in loaded and linear_features(m) is not None and _matches_target(config, p)
        ]
        if missing:
            raise ValueError(
                f"{label}: target_modules selects {len(missing)} module(s) of the model that the file has no "
                f"weights for, e.g. {missing[0]!r} (was the adapter trained on another architecture?)"
            )

    info = AdapterInfo(
        name=name,
        path=path,
        rank=r,
        alpha=float(alpha),
        use_rslora=use_rslora,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        target_modules=config["target_modules"],
        targets=tuple(sorted(loaded)),
        module_ranks={p: m.rank for p, m in loaded.items()},
        module_scales={p: m.scale for p, m in loaded.items()},
    )
    return LoadedAdapter(info, loaded)


# -- the serving check: config, rank and safetensors header, remembered per directory ---------------------


class _CheckedDirs:
    """The directories :func:`check_adapter_dir` passed: ``(resolved path, values)`` -> (stamp, rank).

    An LRU of ``maxsize`` entries behind a lock (a server's event loop and an engine's threads both
    check). An entry counts only while its stamp (:func:`_stamp`) is the files' stamp now: a file
    written, replaced or re-linked since is read again. Only passes are kept; a refused directory is
    read again on every check (its error names the path it was given).
    """

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, bool], tuple[tuple, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, bool], stamp: tuple) -> int | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple[str, bool], stamp: tuple, rank: int) -> None:
        with self._lock:
            self._entries[key] = (stamp, rank)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_CHECKED = _CheckedDirs()


def _stamp(path: str) -> tuple | None:
    """What says the config and the weights of directory ``path`` are unchanged (stat only): per file
    its device, inode, mtime and ctime (ns) and size. None when either file is missing."""
    stamp = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            return None
        stamp.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(stamp)


def _adapter_rank(path: str, values: bool) -> int:
    """The largest rank of a PEFT adapter directory (``r`` and ``rank_pattern``); ValueError if not LoRA."""
    config = read_adapter_config(path)
    ranks = [int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):  # never unpickled: it could run code
            raise ValueError(f"holds only {PICKLE_NAME} (a pickle); save it as {WEIGHTS_NAME}")
        raise FileNotFoundError(f"no {WEIGHTS_NAME}")
    _check_safetensors(weights, values)
    return max(ranks)


def _check_safetensors(path: str, values: bool) -> None:
    """safetensors reads the header and checks it covers the file (a truncated copy fails here); with
    ``values``, every tensor is read and must be finite (a NaN adapter would serve NaN)."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError(f"{name} holds no tensors")
            for key in keys if values else ():
                if not bool(torch.isfinite(f.get_tensor(key)).all()):
                    raise ValueError(f"{name}: tensor {key!r} holds NaN or inf")
    except SafetensorError as e:
        raise ValueError(f"{name} is truncated or corrupt ({e})") from None


def check_adapter_dir(path: str | os.PathLike, max_rank: int | None, label: str, values: bool = False) -> int:
    """The largest rank of the LoRA in directory ``path``, checked for serving.

    Reads ``adapter_config.json`` (:func:`read_adapter_config`) and the header of
    ``adapter_model.safetensors`` (a truncated file fails); refuses a directory with only a pickled
    ``adapter_model.bin`` (never unpickled); with ``values``, also reads every tensor (NaN / inf
    refused: for first loads, not for each request). Raises FileNotFoundError / ValueError naming
    ``label``, and ValueError when the rank is above ``max_rank`` (None: no bound).

    A directory that passed is remembered (1024 directories, least recently checked first out) by its
    resolved path and ``values``, with the inode, mtime, ctime and size of both files: checking it
    again costs a few ``stat`` calls and reads no file until one of them changes. A pass with
    ``values`` also answers a check without.
    """
    path = os.fspath(path)
    resolved = os.path.realpath(path)
    stamp = _stamp(resolved)
    rank = None
    if stamp is not None:
        for key in ((resolved, values), (resolved, True)) if not values else ((resolved, True),):
            rank = _CHECKED.get(key, stamp)
            if rank is not None:
                break
    if rank is None:
        try:
            rank = _adapter_rank(path, values)
        except (OSError, ValueError) as e:
            raise type(e)(f"{label}: {e}") from None
        if stamp is not None:  # the stamp taken before reading: a file changed meanwhile is read again
            _CHECKED.put((resolved, values), stamp, rank)
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"{label}: rank {rank} is above this server's max_lora_rank ({max_rank})")
    return rank
