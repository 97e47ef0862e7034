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


# --- The determinism, layouts and model paths that only a GPU can show (issue 11) -----------------


def test_split_k_sum_is_bitwise_reproducible():
    """The design decode shape splits K (compile-check's report); two runs must agree bit for bit."""
    from dlplora_triton.kernels import shrink_config

    inputs = make_inputs(GPU_CASES[0], torch.bfloat16, device="cuda")
    L = inputs["lora_a"].shape[0]
    plan = dlp.build_plan(inputs["seq_offsets"], inputs["adapter_ids"], inputs["adapter_weights"], L)
    _, R, K = inputs["lora_a"].shape
    assert shrink_config(plan.shrink_tile_start.numel(), K, R, torch.bfloat16)["SPLIT_K"] > 1
    first = dlp.fused_lora(**inputs)
    for _ in range(3):
        assert torch.equal(first, dlp.fused_lora(**inputs))


@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("case", GPU_CASES[:3], ids=str)
def test_layers_transposed_b_layout(case, dtype, tol):
    """B as the layers store it: [L, R, N] memory viewed as [L, N, R] (N contiguous)."""
    inputs = make_inputs(case, dtype, device="cuda")
    ref = reference_delta({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    b = inputs["lora_b"]
    inputs["lora_b"] = b.transpose(1, 2).contiguous().transpose(1, 2)
    assert inputs["lora_b"].stride(1) == 1 and torch.equal(inputs["lora_b"], b)
    assert rel_error(dlp.fused_lora(**inputs), ref) < tol


def _loaded_kernels() -> list[tuple[str, object]]:
    """(name, CompiledKernel) of every variant the JIT has loaded in this process (triton 3.x caches)."""
    from dlplora_triton.kernels.lora_expand import _lora_expand_kernel
    from dlplora_triton.kernels.lora_shrink import _lora_shrink_kernel

    found = []
    for fn in (_lora_shrink_kernel, _lora_expand_kernel):
        caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", {})
        for entry in caches.values():
            kernels = entry[0] if isinstance(entry, tuple) else entry
            found += [(fn.__name__, k) for k in kernels.values()]
    return found


def test_loaded_kernels_do_not_spill_and_match_compile_check():
    """n_spills == 0 for every variant loaded by the tests above, and registers next to compile-check's
    (written to bench/results/<gpu>/loaded_kernels.json; the committed report may come from another triton)."""
    import json
    from pathlib import Path

    import triton

    for case in GPU_CASES:
        for dtype, _ in ((torch.bfloat16, 0), (torch.float16, 0)):
            dlp.fused_lora(**make_inputs(case, dtype, device="cuda"))
    torch.cuda.synchronize()
    loaded = _loaded_kernels()
    assert loaded, "no compiled kernel found in the JIT caches"
    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / "bench" / "results" / "static" / "compile_check.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    static = {}
    for v in report["variants"]:
        if v["arch"] == arch and "registers" in v:
            static.setdefault(v["kernel"], []).append(v["registers"])
    rows = []
    for name, kernel in loaded:
        if getattr(kernel, "n_spills", None) is None:
            kernel._init_handles()
        rows.append({"kernel": name, "n_regs": kernel.n_regs, "n_spills": kernel.n_spills})
    out = (
        root / "bench" / "results" / "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name())
    )
    out = out.parent / out.name.strip("-").lower()
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "triton": triton.__version__,
        "static_triton": report["environment"]["triton"],
        "arch": arch,
        "loaded": rows,
        "static_registers": {k: [min(v), max(v)] for k, v in static.items()},
    }
    (out / "loaded_kernels.json").write_text(json.dumps(summary, indent=1))
    assert all(r["n_spills"] == 0 for r in rows), rows


def _llama_with_adapters(tmp_path, dtype):
    from peft_helpers import PeftOracle, make_model, save_adapter

    base = make_model("llama")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = {
        "a": save_adapter(base, tmp_path / "a", 1, scale=0.2, r=8, lora_alpha=16, target_modules=projections),
        "b": save_adapter(
            base, tmp_path / "b", 2, scale=0.2, r=16, lora_alpha=16, target_modules=projections
        ),
    }
    oracle = PeftOracle(base, paths)
    import copy

    model = copy.deepcopy(base).to("cuda", dtype)
    return model, dlp.attach(model, paths), oracle


ROWS = [[("a", 0.7), ("b", 0.3)], [("b", 1.0)], [], [("a", 1.0)]]


def test_bf16_llama_with_attached_adapters_matches_peft(tmp_path):
    model, lora, oracle = _llama_with_adapters(tmp_path, torch.bfloat16)
    ids = torch.randint(3, 97, (len(ROWS), 12), generator=torch.Generator().manual_seed(0))
    lora.select(ROWS)
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
    for i, row in enumerate(ROWS):
        ref = oracle.logits(row, ids[i : i + 1])[0]
        assert rel_error(got[i], ref) < 3e-2, (i, row)  # bf16 weights and activations through 2 layers


def test_cuda_graph_replays_a_decode_step_of_a_patched_model(tmp_path):
    """One decode step (one new token per row) of the patched model captured once and replayed with
    new token ids: the selection's plan is built at select time, so the forward has no host sync."""
    model, lora, _ = _llama_with_adapters(tmp_path, torch.float16)
    lora.select(ROWS)
    static_ids = torch.randint(3, 97, (len(ROWS), 1), device="cuda")

    def step():
        return model(static_ids, use_cache=False).logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        logits = step()
    new_ids = torch.randint(3, 97, static_ids.shape, device="cuda")
    static_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        eager = model(new_ids, use_cache=False).logits
    assert rel_error(logits.float(), eager.float()) < 1e-3


def test_torch_compile_of_a_patched_model(tmp_path):
    model, lora, _ = _llama_with_adapters(tmp_path, torch.bfloat16)
    lora.select(ROWS)
    ids = torch.randint(3, 97, (len(ROWS), 10), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits.float()
        compiled = torch.compile(model)(ids).logits.float()
    assert rel_error(compiled, eager) < 1e-2


def test_backward_through_a_patched_model_matches_peft(tmp_path):
    """loss.backward() on CUDA: the gradient reaching the input embeddings equals PEFT's under the
    same mix (fp32), so the LoRA delta's backward is right for every layer below the loss."""
    model, lora, oracle = _llama_with_adapters(tmp_path, torch.float32)
    row = ROWS[0]
    lora.select([row])
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids.cuda()).cpu()
    ours = embeds.cuda().requires_grad_()
    model(inputs_embeds=ours, labels=ids.cuda()).loss.backward()
    ref = embeds.clone().requires_grad_()
    with oracle.active(row):
        oracle.model(inputs_embeds=ref, labels=ids).loss.backward()
    assert ours.grad is not None and ref.grad is not None
    assert rel_error(ours.grad.cpu(), ref.grad) < 1e-3  # fp32 throughout; IEEE dots in the kernels
