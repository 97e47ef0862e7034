"""Gradients of the fused LoRA delta with respect to the factors, the fusion weights and the scales.

With ``c[t, i] = scales[i] * sum_p w[t, p] [ids[t, p] == i]`` (the summed coefficient of adapter ``i``
for token ``t``), ``v[t, i] = x[t] A_i^T`` and ``g[t, i] = dy[t] B_i`` (both ``[r_i]``)::

    dx[t]      = sum_i c[t, i] g[t, i] A_i              (the op itself, with B^T as "A" and A^T as "B")
    dA_i       = sum_t c[t, i] g[t, i]^T x[t]
    dB_i       = sum_t c[t, i] dy[t]^T v[t, i]
    dw[s, p]   = scales[i] sum_{t in s} <v[t, i], g[t, i]>      with i = ids[s, p]
    dscales[i] = sum_t (c[t, i] / scales[i]) <v[t, i], g[t, i]>

computed densely over the ``L * R`` rank units (units beyond a rank are zeroed, never read): two
matmuls for ``v`` and ``g`` and two for ``dA`` and ``dB``, ``T * L * R`` extra floats.
"""

from __future__ import annotations

import torch

from ..plan import LoRAPlan
from .torch_path import _coefficients, token_weights

__all__ = ["factor_grads"]


def factor_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    adapter_weights: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``(d lora_a [L, R, K], d lora_b [L, N, R], d adapter_weights [S, P], d scales [L])``, each only
    where ``needs`` (same order) asks for it, else None. ``dy``: ``[T, N]``, the output's gradient.

    The fusion weights are ``adapter_weights`` when given, else the plan's (whose gradient is then
    the caller's to refuse: the plan is built once and holds no autograd history by contract).
    """
    need_a, need_b, need_w, need_s = needs
    L, R, K = lora_a.shape
    N = lora_b.shape[1]
    T = x.shape[0]
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    device = x.device
    if T == 0 or plan.num_slots == 0 or L * R == 0:
        zeros = (
            torch.zeros_like(lora_a) if need_a else None,
            torch.zeros_like(lora_b) if need_b else None,
            torch.zeros(plan.seq_adapter.shape, device=device) if need_w else None,
            torch.zeros(L, device=device) if need_s else None,
        )
        return zeros
    keep = torch.ones(L, R, dtype=torch.bool, device=device)
    if ranks is not None:
        keep = torch.arange(R, device=device) < ranks.to(device)[:, None]
    a_rows = torch.where(keep[:, :, None], lora_a, 0).reshape(L * R, K).to(acc)
    b_rows = torch.where(keep[:, :, None], lora_b.transpose(1, 2), 0).reshape(L * R, N).to(acc)
    scale = torch.ones(L, device=device, dtype=acc) if scales is None else scales.to(device, acc)
    _, tok_w = token_weights(plan, None if adapter_weights is None else adapter_weights.detach())
    weight = _coefficients(plan, tok_w).to(acc)  # [T, L], summed fusion weight (no scale)
    coef = (weight * scale).repeat_interleave(R, dim=1)  # [T, L*R]
    x_acc, dy_acc = x.to(acc), dy.to(acc)
    g = dy_acc @ b_rows.t()  # [T, L*R]
    v = x_acc @ a_rows.t() if (need_b or need_w or need_s) else None
    d_a = (g * coef).t().mm(x_acc).view(L, R, K).to(lora_a.dtype) if need_a else None
    d_b = None
    if need_b:
        d_b = dy_acc.t().mm(v * coef).view(N, L, R).permute(1, 0, 2).to(lora_b.dtype)
    d_w = d_s = None
    if need_w or need_s:
        inner = (v * g).view(T, L, R).sum(-1)  # [T, L]: <v[t, i], g[t, i]>
        if need_s:
            d_s = (inner * weight).sum(0).to(torch.float32 if scales is None else scales.dtype)
        if need_w:
            ids = plan.token_adapter.long()
            per_slot = inner.gather(1, ids.clamp(min=0)) * scale.index_select(
                0, ids.clamp(min=0).view(-1)
            ).view(ids.shape)
            per_slot = torch.where(ids >= 0, per_slot, 0)  # [T, P]
            S = plan.seq_adapter.shape[0]
            d_w = torch.zeros(S, plan.num_slots, device=device, dtype=acc)
            d_w.index_add_(0, plan.token_seq.long(), per_slot)
            d_w = d_w.to(torch.float32 if adapter_weights is None else adapter_weights.dtype)
    return d_a, d_b, d_w, d_s
