"""The dynamic-rank controller: :class:`DynamicLoRA` adapts a model's linear layers and moves rank
between them under a fixed budget (docs/dynamic-rank.md). It delegates the layers to :mod:`.layers`,
scoring and the schedule to :mod:`.importance`, rank changes to :mod:`.ranks`, files to :mod:`.export`."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..modules import set_child
from . import export
from .callback import DynamicLoRACallback
from .importance import Importance, RankSchedule, _is_int, plan_moves
from .layers import DynamicLoRALinear
from .ranks import set_rank, swap_data, unwrap_optimizer
from .targets import match_saved_modules, match_target_modules

__all__ = ["DynamicLoRA"]


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
        importance: ``"sensitivity"`` (default) or ``"grad_norm"`` (docs/dynamic-rank.md).
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
        Importance(importance, 0, beta1, beta2)  # checks importance, beta1 and beta2 first
        if not _is_int(interval) or interval <= 0:
            raise ValueError(
                f"interval (steps between reallocations) must be a positive int, got {interval!r}"
            )
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
        save_paths = match_saved_modules(model, modules_to_save, paths)
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
        self.tracker = Importance(importance, n, beta1, beta2)  # I_bar, U_bar per module
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict] = []  # one entry per reallocation (and the start)

        for p in model.parameters():
            p.requires_grad_(False)
        ranks = [budget // n + (1 if i < budget % n else 0) for i in range(n)]
        self.layers: dict[str, DynamicLoRALinear] = {}
        for path, rank in zip(paths, ranks):
            layer = DynamicLoRALinear(modules[path], rank, self.scale, input_gate, self.generator)
            set_child(model, path, layer)
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
        return dict(zip(self.paths, self.tracker.score().tolist()))

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
        optimizer = unwrap_optimizer(optimizer)
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
            set_child(self.model, path, layer.base)
        self.layers = {}

    # ------------------------------------------------------------------ training step
    def step(self, optimizer=None) -> bool:
        """Call after every ``optimizer.step()``, before ``zero_grad()``: updates the importance and
        reallocates when the schedule says so. Returns True when ranks moved at this step."""
        if self.schedule is None:
            raise RuntimeError(
                "total_steps is not set: pass total_steps=... or call set_total_steps(n) first"
            )
        if optimizer is not None and unwrap_optimizer(optimizer) is not self.optimizer:
            self.bind_optimizer(optimizer)
        if self.optimizer is None:
            raise RuntimeError("no optimizer bound: call bind_optimizer(opt) (or pass it to step) first")
        if not self.layers:
            raise RuntimeError("this DynamicLoRA was detached")
        self.global_step += 1
        self.tracker.update(list(self.layers.values()))
        if self.schedule.reallocates_at(self.global_step):
            return self.reallocate()
        return False

    # ------------------------------------------------------------------ reallocation
    def plan_moves(self) -> list[tuple[str, str]]:
        """The (donor, receiver) pairs the next reallocation would make, from the current scores."""
        ranks = [self.layers[p].rank for p in self.paths]
        pairs = plan_moves(self.tracker.score().tolist(), ranks, self.max_rank, self.moves)
        return [(self.paths[d], self.paths[r]) for d, r in pairs]

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
        set_rank(layer, rank, self.generator, self.optimizer, path)

    def _record(self, pairs: list[tuple[str, str]]) -> None:
        self.history.append(
            {
                "step": self.global_step,
                "ranks": [self.layers[p].rank for p in self.paths],
                "scores": self.tracker.score().tolist(),
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
            "ipt": self.tracker.ipt.clone(),
            "unc": self.tracker.unc.clone(),
            "global_step": self.global_step,
            "generator": self.generator.get_state(),
            "history": json.dumps(self.history),
            "schedule": None if self.schedule is None else self.schedule.as_dict(),
        }

    def load_state_dict(self, state: dict, source: str = "DynamicLoRA state") -> None:
        """Restore :meth:`state_dict`: reshapes every adapted module to the saved ranks (values are then
        loaded with the model's state dict, and the optimizer's state after the optimizer is built).
        Everything is checked first: a bad state raises ValueError naming ``source`` and changes nothing."""
        ranks, ipt, unc, history, schedule = self._check_state(state, source)
        with torch.no_grad():
            for path, rank in zip(self.paths, ranks):
                layer = self.layers[path]
                a, b = layer.lora_A, layer.lora_B
                swap_data(a, torch.zeros(rank, layer.in_features, device=a.device, dtype=a.dtype))
                swap_data(b, torch.zeros(layer.out_features, rank, device=b.device, dtype=b.dtype))
        self.tracker.ipt, self.tracker.unc = ipt, unc
        self.global_step = int(state["global_step"])
        self.generator.set_state(state["generator"])
        self.history = history
        if schedule is not None:
            self.schedule = schedule

    def _check_state(self, state, source: str):
        """The parts of a saved state, every one checked against this controller (nothing changed)."""
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a dict, got {type(state).__name__}")
        missing = [
            k
            for k in ("paths", "budget", "ranks", "ipt", "unc", "global_step", "generator", "history")
            if k not in state
        ]
        if missing:
            raise ValueError(f"{source}: not a DynamicLoRA state (no {', '.join(missing)})")
        if list(state["paths"]) != self.paths or state["budget"] != self.budget:
            raise ValueError(
                f"{source}: this DynamicLoRA state was saved for other modules or another budget "
                f"(saved budget {state['budget']}, {len(state['paths'])} modules; "
                f"here budget {self.budget}, {len(self.paths)} modules)"
            )
        n, ranks = len(self.paths), state["ranks"]
        limits = [min(self.layers[p].in_features, self.layers[p].out_features) for p in self.paths]
        if (
            not isinstance(ranks, (list, tuple))
            or len(ranks) != n
            or not all(_is_int(r) and 1 <= r <= lim for r, lim in zip(ranks, limits))
            or sum(ranks) != self.budget
        ):
            raise ValueError(
                f"{source}: ranks {ranks!r} are not {n} ranks in [1, in/out features] summing to {self.budget}"
            )
        moments = []
        for key in ("ipt", "unc"):
            t = state[key]
            if not (
                isinstance(t, torch.Tensor)
                and t.shape == (n,)
                and t.is_floating_point()
                and torch.isfinite(t).all()
            ):
                raise ValueError(f"{source}: {key!r} must be a finite float tensor of shape [{n}]")
            moments.append(t.clone().double())
        if not _is_int(state["global_step"]) or state["global_step"] < 0:
            raise ValueError(f"{source}: global_step must be an int >= 0, got {state['global_step']!r}")
        try:
            torch.Generator().set_state(state["generator"])
            history = json.loads(state["history"])
        except (TypeError, RuntimeError, ValueError) as err:
            raise ValueError(f"{source}: malformed generator state or history ({err})") from None
        if not isinstance(history, list):
            raise ValueError(f"{source}: history must be a JSON list")
        schedule = state.get("schedule")
        if schedule is not None:
            try:
                schedule = RankSchedule(
                    schedule["total_steps"],
                    schedule["interval"],
                    schedule["warmup_steps"],
                    schedule["final_steps"],
                )
            except (TypeError, KeyError, ValueError) as err:
                raise ValueError(f"{source}: malformed schedule {state['schedule']!r} ({err})") from None
        return list(ranks), moments[0], moments[1], history, schedule

    # ------------------------------------------------------------------ export
    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` contents for the current ranks (PEFT LoRA, per-module patterns)."""
        return export.peft_config(self, base_model_name_or_path)

    def save_pretrained(self, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT LoRA adapter directory for the current ranks (:func:`.export.save_pretrained`)."""
        return export.save_pretrained(self, path, base_model_name_or_path)
