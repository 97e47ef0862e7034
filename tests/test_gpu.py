"""Compiled kernels on a CUDA device: realistic shapes, bf16, determinism, CUDA-graph capture."""

import pytest
import torch
from lora_cases import Case, make_inputs, reference_delta, rel_error

import dlplora_triton as dlp

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case("decode_S64_P3_L32", [1] * 64, P=3, L=32, K=4096, N=4096, R=16, empty_slot_frac=0.1),
    Case(
        "decode_hidden2049_N1000_ranks1to128_L128",
        [1] * 48,
        P=4,
        L=128,
        K=2049,
        N=1000,
        R=128,
        ranks=[1 + (i * 37) % 128 for i in range(128)],
    ),
    Case(
        "prefill_8x512_mixed",
        [512, 3, 0, 511, 64, 200, 1, 7],
        P=2,
        L=8,
        K=1024,
        N=1536,
        R=64,
        ranks=[8, 16, 64, 1, 32, 48, 0, 17],
    ),
    Case("shared_adapter_S128", [1] * 128, P=2, L=16, K=4096, N=1024, R=16, shared_adapter=5),
]

# bf16/fp16 round both dots' inputs (v is cast to the weights' dtype before the expand dot).
GPU_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]


@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_compiled_kernels_match_reference(case, dtype, tol):
    inputs = make_inputs(case, dtype, device="cuda")
    ref = reference_delta({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    y = dlp.fused_lora(**inputs)  # auto: Triton on CUDA
    assert rel_error(y, ref) < tol
    assert torch.equal(y, dlp.fused_lora(**inputs)), "two runs must agree bit for bit"


@pytest.mark.parametrize("case", GPU_CASES[:2], ids=str)
def test_torch_backend_on_cuda(case):
    inputs = make_inputs(case, torch.float32, device="cuda")
    ref = reference_delta({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    assert rel_error(dlp.fused_lora(**inputs, backend="torch"), ref) < 1e-5


def test_planned_call_is_captured_in_a_cuda_graph():
    case = GPU_CASES[0]
    inputs = make_inputs(case, torch.float16, device="cuda")
    T, L = inputs["x"].shape[0], inputs["lora_a"].shape[0]
    out = torch.zeros(T, case.N, device="cuda", dtype=torch.float16)

    def step():
        plan = dlp.build_plan(
            inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], L, num_tokens=T
        )
        out.zero_()
        dlp.fused_lora_planned(
            inputs["x"],
            inputs["lora_a"],
            inputs["lora_b"],
            plan,
            ranks=inputs["ranks"],
            scales=inputs["scales"],
            out=out,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New routing in the same buffers: the replay must follow it.
    inputs["adapter_ids"].copy_(torch.randint(0, L, inputs["adapter_ids"].shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_delta({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    assert rel_error(out, ref) < 1e-2


def test_repeated_calls_do_not_grow_allocated_memory():
    inputs = make_inputs(GPU_CASES[0], torch.bfloat16, device="cuda")
    L = inputs["lora_a"].shape[0]
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], L)
    out = torch.zeros(inputs["x"].shape[0], GPU_CASES[0].N, device="cuda", dtype=torch.bfloat16)

    def call():
        dlp.fused_lora_planned(
            inputs["x"], inputs["lora_a"], inputs["lora_b"], plan, scales=inputs["scales"], out=out
        )

    call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
