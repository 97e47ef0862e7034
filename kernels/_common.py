"""Helpers shared by the shrink and expand kernels."""

import triton
import triton.language as tl


@triton.jit
def dot_acc(acc, b_lhs, b_rhs, IEEE: tl.constexpr):
    """``acc += b_lhs @ b_rhs`` with fp32 accumulation; IEEE fp32 products when IEEE (no tf32)."""
    if IEEE:
        return tl.dot(b_lhs, b_rhs, acc, input_precision="ieee")
    return tl.dot(b_lhs, b_rhs, acc)
