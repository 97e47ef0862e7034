"""The punica wrapper: vLLM's LoRA math on dlplora_triton's kernels (see docs/vllm.md).

:func:`dlplora_triton.integrations.vllm.register` makes ``vllm.lora.punica_wrapper.get_punica_wrapper()``
build :class:`PunicaWrapperDLP`. It serves vLLM's one-adapter-per-request mapping exactly as vLLM's own
wrappers do, and beyond it weighted mixes per request (the engine hooks hand it each step's routes,
:mod:`dlplora_triton.integrations.vllm.engine`) and per-token routes
(:class:`~dlplora_triton.integrations.vllm.mixes.LoRARouteMapping`): every (token, slot) pair of a step
goes into one prepared batch (:func:`dlplora_triton.ops.prepare_batch`: the plan and its host data),
built once per ``update_metadata`` and shared by every layer, and each layer is one :func:`dlplora_triton.fused_lora_planned` call per output slice
(Triton on CUDA tensors, the PyTorch path on CPU tensors).

vLLM's stacked weights map onto the kernel's without a copy: ``lora_a_stacked[i]`` is
``[L, 1, R, K]`` (``L`` = max_loras slots, ``R`` = max_lora_rank, zero-padded, the scale folded into
B) and ``lora_a_stacked[i][:, 0]`` is the kernel's ``[L, R, K]``; ``lora_b_stacked[i][:, 0]`` is
``[L, N, R]``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from dlplora_triton.integrations.vllm.mixes import LoRARouteMapping, slot_routing
from dlplora_triton.ops import fused_lora_planned, prepare_batch

__all__ = ["WRAPPER_QUALNAME", "PunicaWrapperDLP", "next_step_routes"]

WRAPPER_QUALNAME = "dlplora_triton.integrations.vllm.wrapper.PunicaWrapperDLP"

# The routes of the step being set up (tokens, sampled rows), handed over by the engine hook for the
# duration of its call into vLLM's LoRA manager, which calls update_metadata without them.
_NEXT_ROUTES: list[tuple[LoRARouteMapping, LoRARouteMapping] | None] = [None]


@contextlib.contextmanager
def next_step_routes(tokens: LoRARouteMapping, samples: LoRARouteMapping):
    """Within the block, ``update_metadata`` calls without a ``route`` use these (one step's mixes)."""
    _NEXT_ROUTES[0] = (tokens, samples)
    try:
        yield
    finally:
        _NEXT_ROUTES[0] = None


class _StepBatch:
    """One step's rows on the device: the prepared batch, per-row LoRA flags and the slots they involve."""

    def __init__(
        self,
        ids: torch.Tensor,
        weights: torch.Tensor,
        row_plain: torch.Tensor,
        num_slots: int,
        device,
        own: torch.Tensor | None = None,
    ):
        T = ids.shape[0]
        # Consecutive rows with the same routing form one plan sequence (vLLM packs requests).
        if T:
            change = torch.ones(T, dtype=torch.bool)
            change[1:] = (ids[1:] != ids[:-1]).any(1) | (weights[1:] != weights[:-1]).any(1)
            starts = change.nonzero().squeeze(1)
        else:
            starts = torch.zeros(0, dtype=torch.int64)
        offsets = torch.cat([starts, torch.tensor([T], dtype=torch.int64)])
        self.num_rows = T
        self.num_slots = num_slots
        self._host = (ids, weights, row_plain, device, own)
        self._padded: dict[int, _StepBatch] = {}
        self.plain = bool(row_plain.all())  # vLLM's own one-adapter-per-row case everywhere
        self.any_lora = bool((ids >= 0).any())  # False: every layer call of the step adds nothing
        self.has_lora = (ids >= 0).any(1).to(device) if T else torch.zeros(0, dtype=torch.bool, device=device)
        # Rows where vLLM's per-slot data (embedding rows gathered by the mapping's slot ``own``, full
        # modules by the sampler's) is not what the routing says: mixes, and one adapter at weight 1
        # other than the mapping's (a route, or a mix whose anchor has weight 0).
        off = ~row_plain if own is None else ~(row_plain & (ids[:, 0] == own))
        mixed = ids[off]
        self.mixed_slots = torch.unique(mixed[mixed >= 0]).tolist()  # slots these rows read
        own_off = own[off] if own is not None else own
        self.own_slots = [] if own is None else torch.unique(own_off[own_off >= 0]).tolist()
        # The step's plan and its host data (read once per step for all of the step's layers).
        self.batch = prepare_batch(
            offsets.to(device), ids[starts].to(device), weights[starts].to(device), num_slots, num_tokens=T
        )

    def padded(self, rows: int) -> _StepBatch:
        """This routing with ``rows - num_rows`` more rows without LoRA (vLLM may pad a batch's tokens)."""
        if rows not in self._padded:
            ids, weights, row_plain, device, own = self._host
            extra = rows - self.num_rows
            self._padded[rows] = _StepBatch(
                torch.cat([ids, ids.new_full((extra, ids.shape[1]), -1)]),
                torch.cat([weights, weights.new_zeros(extra, weights.shape[1])]),
                torch.cat([row_plain, row_plain.new_ones(extra)]),
                self.num_slots,
                device,
                None if own is None else torch.cat([own, own.new_full((extra,), -1)]),
            )
        return self._padded[rows]


class PunicaWrapperDLP(PunicaWrapperBase):
    """A vLLM punica wrapper whose LoRA math runs on :func:`dlplora_triton.fused_lora_planned`.

    Args (as vLLM passes them): ``max_num_batched_tokens``, ``max_batches``, ``device``; keyword
    ``lora_config`` (unused) and ``backend`` (``"auto"`` | ``"triton"`` | ``"torch"``, default
    ``$DLPLORA_VLLM_BACKEND`` or ``"auto"``).

    ``update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, route=None, sample_route=None)``
    takes vLLM's ``LoRAMapping`` (one LoRA id per token, ``0`` = none) and optionally
    :class:`LoRARouteMapping` s that replace the per-token ids (``route``, the linear layers) and the
    per-sampled-row ids (``sample_route``, the logits layer); inside :func:`next_step_routes` (the
    engine hook's mixes) the routes come from there.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        PunicaWrapperBase.__init__(self, max_num_batched_tokens, max_batches, device)
        self.backend = kwargs.get("backend") or os.environ.get("DLPLORA_VLLM_BACKEND", "auto")
        self._tokens: _StepBatch | None = None
        self._samples: _StepBatch | None = None
        self._route_active = False
        self._eye: dict[tuple, torch.Tensor] = {}
        self._ranks: dict[tuple, tuple[int, torch.Tensor]] = {}  # per A stack: (its version, slot ranks)

    # -- metadata -------------------------------------------------------------------------------------

    def update_metadata(
        self,
        mapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        route: LoRARouteMapping | None = None,
        sample_route: LoRARouteMapping | None = None,
        **kwargs,
    ) -> None:
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = mapping.is_prefill
        if route is None and _NEXT_ROUTES[0] is not None:
            route, sample_route = _NEXT_ROUTES[0]
        L = len(lora_index_to_id)
        num_tokens = len(mapping.index_mapping)
        own = self.token_lora_indices[:num_tokens].to("cpu")  # vLLM's slot per token, -1 = none
        if route is None:
            ids, weights, row_plain = slot_routing(L, own.unsqueeze(1))
        else:
            ids, weights, row_plain = self._route_slots(route, lora_index_to_id, num_tokens, "tokens")
        self._route_active = route is not None and sample_route is None
        self._tokens = _StepBatch(ids, weights, row_plain, L, self.device, own)
        num_samples = len(mapping.prompt_mapping)
        own_samples = self.sampler_indices[:num_samples].to("cpu")
        if sample_route is None:
            s_ids, s_w, s_plain = slot_routing(L, own_samples.unsqueeze(1))
        else:
            s_ids, s_w, s_plain = self._route_slots(
                sample_route, lora_index_to_id, num_samples, "sampled rows"
            )
        self._samples = _StepBatch(s_ids, s_w, s_plain, L, self.device, own_samples)

    @staticmethod
    def _route_slots(route: LoRARouteMapping, lora_index_to_id, rows: int, what: str):
        """A route's LoRA ids as slots: ``(ids, weights, row_plain)`` of :func:`slot_routing`."""
        if not isinstance(route, LoRARouteMapping):
            raise TypeError(f"route must be a LoRARouteMapping, got {type(route).__name__}")
        route_ids, route_w = route.tensors()
        if route_ids.shape[0] != rows:
            raise ValueError(
                f"LoRARouteMapping has {route_ids.shape[0]} rows but the LoRAMapping has {rows} {what}"
            )
        slot_of = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        unknown = sorted({int(i) for i in route_ids[route_ids > 0].tolist()} - set(slot_of))
        if unknown:
            raise KeyError(f"LoRARouteMapping names LoRA ids {unknown} that are in no LoRA slot")
        slots = route_ids.clone().apply_(lambda i: slot_of.get(i, -1) if i > 0 else -1)
        return slot_routing(len(lora_index_to_id), slots, route_w)

    def _routing(self, rows: int, samples: bool = False) -> _StepBatch:
        routing = self._samples if samples else self._tokens
        if routing is None:
            raise RuntimeError("PunicaWrapperDLP: update_metadata must be called before the LoRA layers run")
        if rows > routing.num_rows:  # padded tokens (their outputs are dropped): no LoRA there
            routing = routing.padded(rows)
        elif rows < routing.num_rows:
            raise ValueError(
                f"PunicaWrapperDLP: the layer has {rows} rows but the mapping covers {routing.num_rows} "
                f"{'sampled rows' if samples else 'tokens'}"
            )
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "PunicaWrapperDLP does not support CUDA graph capture yet (its plan is rebuilt per "
                "step): run vLLM with enforce_eager=True"
            )
        return routing

    # -- the one kernel call --------------------------------------------------------------------------

    def _apply(self, routing: _StepBatch, x, lora_a, lora_b, scale: float, out, add_inputs: bool) -> None:
        """``out (+)= delta`` of one slice: ``x [T, K]``, ``lora_a [L, R, K]``, ``lora_b [L, N, R]``."""
        if not routing.any_lora:  # no row of the step has an adapter: vLLM leaves ``out`` as it is
            return
        L = lora_a.shape[0]
        scales = None if scale == 1.0 else torch.full((L,), float(scale), device=x.device)
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        run = dict(ranks=self._slot_ranks(lora_a), scales=scales, backend=self.backend)
        if add_inputs and out.dtype == lora_a.dtype:
            fused_lora_planned(x, lora_a, lora_b, routing.batch, out=out, **run)
            return
        delta = fused_lora_planned(x, lora_a, lora_b, routing.batch, **run)
        if add_inputs:
            out.add_(delta.to(out.dtype))
        else:  # vLLM's semantics: rows with LoRA are overwritten, rows without it are left untouched
            out.copy_(torch.where(routing.has_lora.unsqueeze(1), delta.to(out.dtype), out))

    def _slot_ranks(self, lora_a: torch.Tensor) -> torch.Tensor | None:
        """Each slot's rank in this A stack ``[L, R, K]``: one past its last non-zero row (0: empty).

        vLLM zero-pads every adapter to ``max_lora_rank``; without the ranks each layer call would
        multiply every slot's padding (a fleet's ranks 4 to 64 under ``max_lora_rank`` 64: 2.6x the
        work). Rows past the last non-zero row of A add nothing whatever B holds, so the ranks are
        exact. They are read again whenever vLLM writes the stack (``set_lora`` bumps its version)."""
        if lora_a.is_inference():  # no version counter: no rank read once could be trusted for long
            return None
        version = lora_a._version
        key = (lora_a.data_ptr(), tuple(lora_a.shape), tuple(lora_a.stride()))
        cached = self._ranks.get(key)
        if cached is None or cached[0] != version:
            R = lora_a.shape[1]
            nonzero_rows = lora_a.ne(0).any(dim=2)  # [L, R]
            position = torch.arange(1, R + 1, device=lora_a.device)
            cached = (version, (nonzero_rows * position).amax(dim=1))
            self._ranks[key] = cached
        return cached[1]

    def _identity(self, L: int, R: int, dtype, device) -> torch.Tensor:
        """``[L, R, R]`` identity (a stride-0 view), to run shrink or expand alone through the kernel."""
        key = (R, dtype, device)
        if key not in self._eye:
            self._eye[key] = torch.eye(R, dtype=dtype, device=device)
        return self._eye[key].expand(L, R, R)

    def _require_plain(self, routing: _StepBatch, what: str) -> None:
        if not routing.plain:
            raise NotImplementedError(
                f"PunicaWrapperDLP.{what}: mixes and routes need the fused shrink+expand "
                "(add_lora_linear); vLLM's split path (fully_sharded_loras=True) carries one rank-R vector "
                "per token between the two, so serve mixes with fully_sharded_loras=False"
            )

    def _check_unmixed(self, routing: _StepBatch, stacked: torch.Tensor, what: str) -> None:
        """Fail closed where vLLM hands the wrapper one slot's data per row: no mix may need it."""
        if routing.mixed_slots and bool(stacked[routing.mixed_slots].any()):
            raise NotImplementedError(
                f"PunicaWrapperDLP.{what}: a mix or route uses adapters with weights in this layer, "
                "which vLLM applies per slot only (embedding / modules_to_save); target linear layers"
            )

    # -- PunicaWrapperBase API ------------------------------------------------------------------------

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any):
        """``y[i] = scale * x @ A_i^T`` per slice (0 for rows without LoRA); ``y`` fp32 ``[n, T, R]``."""
        x = x.reshape(-1, x.shape[-1])
        routing = self._routing(x.shape[0])
        self._require_plain(routing, "add_shrink")
        for i, a in enumerate(lora_a_stacked):
            a3 = a[:, 0]
            L, R = a3.shape[:2]
            y[i].zero_()
            self._apply(routing, x, a3, self._identity(L, R, a3.dtype, a3.device), scale, y[i], True)

    def add_expand(
        self, y, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs=True, **kwargs: Any
    ):
        """``y[:, off_i : off_i + n_i] += x[i] @ B_i^T`` per slice, from ``offset_start``."""
        y2 = y.view(-1, y.shape[-1])
        routing = self._routing(y2.shape[0])
        self._require_plain(routing, "add_expand")
        offset = offset_start
        for i, (b, n) in enumerate(zip(lora_b_stacked, output_slices)):
            b3 = b[:, 0]
            L, _, R = b3.shape
            v = x[i].to(b3.dtype)
            out = y2[:, offset : offset + n]
            self._apply(routing, v, self._identity(L, R, b3.dtype, b3.device), b3, 1.0, out, add_inputs)
            offset += n

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs: Any):
        """``y += x @ B^T`` with ``x [T, R]`` the rows vLLM gathered from each token's slot of A."""
        routing = self._routing(x.shape[0])
        self._check_unmixed(routing, lora_b_stacked, "add_lora_embedding")
        b3 = lora_b_stacked[:, 0]
        L, _, R = b3.shape
        y2 = y.view(-1, y.shape[-1])
        self._apply(
            routing, x.to(b3.dtype), self._identity(L, R, b3.dtype, b3.device), b3, 1.0, y2, add_inputs
        )

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, *, buffer=None, **kwargs: Any
    ):
        """``y[:, slice_i] += sum_p w_p * scale * B_i[s_p] A_i[s_p] x`` per slice: one kernel call each."""
        if not len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices):
            raise ValueError(
                f"add_lora_linear: {len(lora_a_stacked)} A slices, {len(lora_b_stacked)} B slices and "
                f"{len(output_slices)} output slices"
            )
        add_inputs = kwargs.pop("add_inputs", True)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        routing = self._routing(x2.shape[0])
        offset = 0
        for a, b, n in zip(lora_a_stacked, lora_b_stacked, output_slices):
            self._apply(routing, x2, a[:, 0], b[:, 0], scale, y2[:, offset : offset + n], add_inputs)
            offset += n

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs: Any):
        """Logits LoRA per sampled row (vLLM's sampler indices), mixes included."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        routing = self._routing(x2.shape[0], samples=True)
        if self._route_active:  # routes are per token; the sampled rows follow the requests' LoRA ids
            self._check_unmixed(self._tokens, lora_b_stacked, "add_lora_logits (with a per-token route)")
        n = min(lora_b_stacked.shape[2], y2.shape[1])  # vocab padding may differ (as vLLM's bgmv)
        self._apply(routing, x2, lora_a_stacked[:, 0], lora_b_stacked[:, 0, :n], scale, y2[:, :n], True)

    def apply_lora_full_linear(self, y, x, weight_stacked, bias_stacked, module_enabled):
        """Full replacement weights (modules_to_save) per sampled row; mixes of them are refused."""
        routing = self._routing(x.shape[0], samples=True)
        if routing.mixed_slots or routing.own_slots:  # rows whose routing is not the sampler's slot
            slots = sorted(set(routing.mixed_slots) | set(routing.own_slots))
            enabled = [s for s in slots if bool(module_enabled[s])]
            if enabled:
                raise NotImplementedError(
                    "PunicaWrapperDLP.apply_lora_full_linear: a mix uses adapters with modules_to_save "
                    f"(slots {enabled}); full modules cannot be mixed"
                )
        indices = self.sampler_indices
        w = weight_stacked[indices.clamp_min(0)]
        if w.dim() == 4:
            w = w[:, 0]
        adapter_y = torch.einsum("bi,boi->bo", x.float(), w.float())
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))
