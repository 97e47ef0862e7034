"""vLLM checks of dlplora_triton.integrations.vllm, run in a process of their own by tests/integrations/vllm/test_vllm.py.

vLLM's real LoRA layer classes (replicated, merged column, QKV, row parallel, embedding, logits) run
with our wrapper swapped in and with vLLM's own wrappers (``PunicaWrapperCPU``, and
``PunicaWrapperGPU``'s Triton ops in the interpreter) on the same weights and mappings. Mixes are
per request, as the engine hook hands them to the wrapper: the request's LoRA in vLLM's
``LoRAMapping`` is the mix's anchor (its first component) and the mix itself is a route, one
``(LoRA id, weight)`` list per token (``route``) and per sampled row (``sample_route``); mixes and
per-token routes are checked against the weighted sum of the components' deltas served by vLLM's own
wrapper one adapter at a time. Also: the engine hooks and the arrival checks, the plugin, vLLM's LoRA
managers end to end against PEFT, empty batches, TP = 2 over gloo in two processes against TP = 1.

    python tests/integrations/vllm/vllm_checks.py OUT.json [CASE ...]     # every case when none is named

Each case writes ``{"ok": bool, "detail": str}``; importing this module does not import vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

LAYERS = ("replicated", "merged_column", "qkv", "row", "embedding", "logits")
CASES = (
    [f"plain-{layer}-{phase}" for layer in LAYERS for phase in ("prefill", "decode")]
    + ["plain-replicated-fp16", "plain-qkv-ours-triton", "plain-row-sharded", "plain-padded-tokens"]
    + [
        f"mix-{layer}-{phase}"
        for layer in ("replicated", "qkv", "row", "logits")
        for phase in ("prefill", "decode")
    ]
    + ["mix-qkv-ours-triton", "mix-sharded-refused", "mix-embedding-refused", "mix-embedding-zero-ok"]
    + ["mix-embedding-anchor-refused", "route-replicated", "route-qkv", "route-logits-refused"]
    + ["route-embedding-plain-refused", "route-full-module-refused", "route-errors", "zero-tokens"]
    + ["slot-ranks", "plugin", "engine-hooks", "manager-peft", "tp2"]
)

K, N, R, VOCAB = 64, 40, 16, 96
RANKS = {1: 8, 2: 3, 3: 16}  # lora id -> rank (mixed ranks; zero-padded to R by vLLM)
SLOTS = [1, 2, 3, None]  # lora_index_to_id: 4 slots, one free
# Mixes per request: (LoRA id, weight) components, the first one the anchor (the request's LoRA id in
# vLLM's LoRAMapping, as mix_request makes it). "mix0" has a zero weight on its anchor: its rows are
# adapter 2 alone, in the anchor's (adapter 3's) slot of the mapping.
MIXES = {"mix": ((1, 0.7), (3, -0.45)), "mix0": ((3, 0.0), (2, 1.0))}


def _env() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _init_dist(world_size: int, rank: int, port: int) -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(
        world_size=world_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    initialize_model_parallel(world_size)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Layers, adapters and mappings.


def _lora_config(dtype, fully_sharded: bool = False):
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(
        max_loras=len(SLOTS), max_lora_rank=R, lora_dtype=dtype, fully_sharded_loras=fully_sharded
    )


def _finish(base):
    base._cpu_skip_gemm_dispatch = True
    base.quant_method.process_weights_after_loading(base)
    return base


def build_layer(kind: str, dtype, seed: int = 0, fully_sharded: bool = False):
    """(vLLM LoRA layer with adapters 1..3 set in slots 0..2, slice sizes, input maker)."""
    import torch
    from vllm.lora import layers as L
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cfg = _lora_config(dtype, fully_sharded)
    if kind == "replicated":
        base, cls, slices = (
            linear.ReplicatedLinear(K, N, bias=False, params_dtype=dtype),
            L.ReplicatedLinearWithLoRA,
            [N],
        )
    elif kind == "merged_column":
        base = linear.MergedColumnParallelLinear(K, [N, 24], bias=False, params_dtype=dtype)
        cls, slices = L.MergedColumnParallelLinearWithLoRA, [N, 24]
    elif kind == "qkv":
        base = linear.QKVParallelLinear(K, 8, 4, 2, bias=False, params_dtype=dtype)
        cls, slices = L.MergedQKVParallelLinearWithLoRA, [32, 16, 16]
    elif kind == "column":
        base = linear.ColumnParallelLinear(K, N, bias=False, gather_output=True, params_dtype=dtype)
        cls, slices = L.ColumnParallelLinearWithLoRA, [N]
    elif kind == "row":
        base = linear.RowParallelLinear(K, N, bias=False, params_dtype=dtype)
        cls = L.RowParallelLinearWithShardedLoRA if fully_sharded else L.RowParallelLinearWithLoRA
        slices = [N]
    elif kind == "embedding":
        base = VocabParallelEmbedding(VOCAB, K, params_dtype=dtype)
        base.weight.data.copy_(rand(*base.weight.shape))
        layer = L.VocabParallelEmbeddingWithLoRA(base)
        layer.create_lora_weights(len(SLOTS), cfg)
        for slot, lid in enumerate(SLOTS[:3]):
            layer.set_lora(slot, rand(RANKS[lid], VOCAB), rand(K, RANKS[lid]))
        return layer, [K], lambda t: torch.randint(0, VOCAB, (t,), generator=g)
    elif kind == "logits":
        head = ParallelLMHead(VOCAB, K, params_dtype=dtype)
        head.weight.data.copy_(rand(*head.weight.shape))
        _finish(head)
        layer = L.LogitsProcessorWithLoRA(LogitsProcessor(VOCAB), K, dtype, torch.device("cpu"), None)
        layer.create_lora_weights(len(SLOTS), cfg)
        for slot, lid in enumerate(SLOTS[:3]):
            layer.set_lora(slot, rand(RANKS[lid], K), rand(VOCAB, RANKS[lid]))
        layer._test_head = head
        return layer, [VOCAB], lambda t: rand(t, K)
    else:
        raise ValueError(kind)
    full = rand(sum(slices), K)
    base.weight_loader(base.weight, full) if kind in ("column", "row") else base.weight.data.copy_(full)
    _finish(base)
    layer = cls(base)
    layer.create_lora_weights(len(SLOTS), cfg)
    for slot, lid in enumerate(SLOTS[:3]):
        r = RANKS[lid]
        a = [rand(r, K) for _ in slices]
        b = [rand(n, r) for n in slices]
        if len(slices) == 1:
            layer.set_lora(slot, a[0], b[0])
        else:
            layer.set_lora(slot, a, b)
    return layer, slices, lambda t: rand(t, K)


def mapping(requests, decode: bool):
    """LoRAMapping for requests [(lora id or 0, tokens), ...]; decode: one token per request."""
    from vllm.lora.layers import LoRAMapping

    index = [lid for lid, n in requests for _ in range(1 if decode else n)]
    return LoRAMapping(
        index_mapping=index, prompt_mapping=[lid for lid, _ in requests], is_prefill=not decode
    )


REQUESTS = [(1, 3), (0, 2), (2, 4), (3, 1), (1, 2), (0, 1)]  # prefill: 13 tokens, 6 requests


def _wrapper(kind: str, **kw):
    import torch

    if kind == "ours":
        from dlplora_triton.integrations.vllm import PunicaWrapperDLP

        return PunicaWrapperDLP(256, 32, torch.device("cpu"), **kw)
    if kind == "cpu":
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        return PunicaWrapperCPU(256, 32, torch.device("cpu"))
    if kind == "triton":
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

        return PunicaWrapperGPU(256, 32, torch.device("cpu"), lora_config=_lora_config(torch.float32))
    raise ValueError(kind)


def run_layer(layer, wrapper, m, x, route=None, slots=SLOTS, sample_route=None):
    """The layer's output with ``wrapper`` set on ``mapping`` m (and the routes, when given)."""
    kwargs = {} if route is None else {"route": route}
    if sample_route is not None:
        kwargs["sample_route"] = sample_route
    wrapper.update_metadata(m, list(slots), len(slots) + 1, VOCAB, **kwargs)
    layer.set_mapping(wrapper)
    if hasattr(layer, "_test_head"):
        return layer._get_logits(x, layer._test_head).clone()
    out = layer(x)
    return (out[0] if isinstance(out, tuple) else out).clone()


def mix_mapping(requests, decode: bool, mixes=MIXES):
    """``(LoRAMapping, token route, sample route)`` of requests ``[(key, tokens), ...]``, ``key`` a LoRA
    id, 0 (no LoRA) or a key of ``mixes``: a mix request's LoRA is its anchor, its rows are its
    components and weights (as the engine hook builds them), a plain request's rows its own id."""
    from dlplora_triton.integrations.vllm import LoRARouteMapping

    def row(key):
        if key in mixes:
            return [c for c, _ in mixes[key]], [float(w) for _, w in mixes[key]]
        return [key], [1.0 if key > 0 else 0.0]

    width = max(len(row(k)[0]) for k, _ in requests)
    rows = []
    for key, n in requests:
        ids, weights = row(key)
        pad = width - len(ids)
        rows.append((ids + [0] * pad, weights + [0.0] * pad, 1 if decode else n))
    anchors = [(mixes[k][0][0] if k in mixes else k, n) for k, n in requests]
    tokens = LoRARouteMapping(
        [ids for ids, _, n in rows for _ in range(n)], [w for _, w, n in rows for _ in range(n)]
    )
    samples = LoRARouteMapping([ids for ids, _, _ in rows], [w for _, w, _ in rows])
    return mapping(anchors, decode), tokens, samples


def rel(a, b, ref) -> float:
    denom = float((ref.double()).norm()) or 1.0
    return float((a.double() - b.double()).norm()) / denom


def _tol(dtype) -> float:
    import torch

    return 1e-5 if dtype == torch.float32 else 1e-2


# ---------------------------------------------------------------------------------------------------
# Cases.


def _plain_outputs(layer_kind: str, phase: str, dtype, wrappers, ours_backend=None):
    layer, _, make_x = build_layer(layer_kind, dtype, fully_sharded=phase == "sharded")
    decode = phase == "decode"
    m = mapping(REQUESTS, decode)
    rows = len(m.prompt_mapping) if layer_kind == "logits" else len(m.index_mapping)
    x = make_x(rows)
    base = run_layer(layer, _wrapper("cpu"), mapping([(0, n) for _, n in REQUESTS], decode), x)
    outs = {}
    for w in wrappers:
        outs[w] = run_layer(layer, _wrapper(w, backend=ours_backend) if w == "ours" else _wrapper(w), m, x)
    return base, outs


def case_plain(layer_kind: str, phase: str, dtype_name: str = "fp32", ours_backend: str | None = None):
    """Ours against PunicaWrapperCPU (this dtype) and against vLLM's Triton ops (fp16: they need it)."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    base, outs = _plain_outputs(layer_kind, phase, dtype, ("cpu", "ours"), ours_backend)
    ref = outs["cpu"]
    if float((ref - base).norm()) == 0:
        return False, "the LoRA delta is zero: the case tests nothing"
    errs = {f"ours_vs_cpu_{dtype_name}": (rel(outs["ours"], ref, ref - base), _tol(dtype))}
    if phase != "sharded" and dtype_name == "fp32":
        # vLLM's Triton shrink takes fp16/bf16 only (bf16 is misread by the interpreter): fp16 here.
        base16, o16 = _plain_outputs(
            layer_kind, phase, torch.float16, ("triton", "cpu", "ours"), ours_backend
        )
        tri = o16["triton"]
        errs["ours_vs_vllm_triton_fp16"] = (rel(o16["ours"], tri, tri - base16), 1e-2)
        errs["cpu_vs_vllm_triton_fp16"] = (rel(o16["cpu"], tri, tri - base16), 1e-2)
    ok = all(e < tol for e, tol in errs.values())
    return ok, "relative error (tolerance): " + ", ".join(
        f"{k} {e:.2e} ({tol:g})" for k, (e, tol) in errs.items()
    )


def case_padded():
    """x with more rows than the mapping (vLLM pads batches): the mapped rows as vLLM, the rest base."""
    import torch

    layer, _, make_x = build_layer("replicated", torch.float32)
    m = mapping(REQUESTS, decode=False)
    T = len(m.index_mapping)
    x = make_x(T + 3)
    ref = run_layer(layer, _wrapper("cpu"), m, x[:T])
    base = run_layer(layer, _wrapper("cpu"), mapping([(0, T + 3)], decode=False), x)
    ours = run_layer(layer, _wrapper("ours"), m, x)
    errs = (rel(ours[:T], ref, ref - base[:T]), rel(ours[T:], base[T:], base[T:]))
    return max(errs) < 1e-5, f"relative errors (mapped rows, padded rows) {errs}"


def _mix_reference(layer, decode: bool, x, requests, mixes=MIXES):
    """base + each mix request's sum_c w_c * delta_c + each plain request's delta, every delta served by
    PunicaWrapperCPU with plain mappings (one adapter per request)."""
    base_map = mapping([(0, n) for _, n in requests], decode)
    base = run_layer(layer, _wrapper("cpu"), base_map, x)
    total = base.double().clone()
    for key, components in mixes.items():
        if all(k != key for k, _ in requests):
            continue
        for cid, w in components:
            # Requests of this mix get component cid; every other request no LoRA.
            m = mapping([(cid if k == key else 0, n) for k, n in requests], decode)
            total += w * (run_layer(layer, _wrapper("cpu"), m, x).double() - base.double())
    plain = mapping([(0 if k in mixes else k, n) for k, n in requests], decode)
    total += run_layer(layer, _wrapper("cpu"), plain, x).double() - base.double()
    return base, total


MIX_REQUESTS = [("mix", 3), (2, 2), (0, 1), ("mix0", 2), ("mix", 2), (1, 3)]


def case_mix(layer_kind: str, phase: str, ours_backend: str | None = None):
    """Two mixes (one anchored on adapter 1, which a plain request also uses) and plain requests in one
    batch, routed per token (linear layers) and per sampled row (logits)."""
    import torch

    dtype = torch.float32
    layer, _, make_x = build_layer(layer_kind, dtype)
    decode = phase == "decode"
    m, tokens, samples = mix_mapping(MIX_REQUESTS, decode)
    rows = len(m.prompt_mapping) if layer_kind == "logits" else len(m.index_mapping)
    x = make_x(rows)
    ours = run_layer(layer, _wrapper("ours", backend=ours_backend), m, x, route=tokens, sample_route=samples)
    base, ref = _mix_reference(layer, decode, x, MIX_REQUESTS)
    # The anchor alone is not the mix: the check would be vacuous if it were.
    anchor_only = run_layer(layer, _wrapper("cpu"), m, x).double()
    err = rel(ours, ref, ref - base.double())
    gap = rel(anchor_only, ref, ref - base.double())
    return (
        err < 1e-5 and gap > 1e-2,
        f"relative error {err} against the weighted sum of vLLM's per-adapter deltas "
        f"(the anchors alone: {gap})",
    )


def case_route(layer_kind: str):
    import torch

    layer, _, make_x = build_layer(layer_kind, torch.float32)
    from dlplora_triton.integrations.vllm import LoRARouteMapping

    T = 7
    ids = [[1, 3], [2, 0], [0, 0], [3, 1], [1, 2], [2, 2], [3, 0]]
    weights = [[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [-0.3, 1.2], [0.5, 0.5], [0.25, 0.5], [2.0, 0.0]]
    x = make_x(T)
    plain0 = mapping([(0, T)], decode=False)
    ours = run_layer(layer, _wrapper("ours"), plain0, x, route=LoRARouteMapping(ids, weights))
    base = run_layer(layer, _wrapper("cpu"), plain0, x).double()
    ref = base.clone()
    for lid in (1, 2, 3):
        per_token = torch.tensor([sum(w for i, w in zip(ri, rw) if i == lid) for ri, rw in zip(ids, weights)])
        delta = run_layer(layer, _wrapper("cpu"), mapping([(lid, T)], decode=False), x).double() - base
        ref += per_token.double().unsqueeze(1) * delta
    err = rel(ours, ref, ref - base)
    return err < 1e-5, f"relative error {err} against the per-token weighted sum of vLLM's deltas"


def _expect(exc_type, fn, words: str):
    name = getattr(exc_type, "__name__", None) or "/".join(t.__name__ for t in exc_type)
    try:
        fn()
    except exc_type as e:
        if words.lower() not in str(e).lower():
            return False, f"{type(e).__name__} raised but its message lacks {words!r}: {e}"
        return True, f"{type(e).__name__}: {e}"
    return False, f"no {name} raised"


def _refused_or_right(fn, ref, words: str):
    """Where vLLM applies one slot's data per row, a route must be refused (naming ``words``) or right."""
    try:
        out = fn()
    except NotImplementedError as e:
        if words.lower() not in str(e).lower():
            return False, f"NotImplementedError raised but its message lacks {words!r}: {e}"
        return True, f"refused: {e}"
    err = rel(out, ref, ref)
    return err < 1e-6, f"served, relative error {err} against vLLM serving the routed adapters"


def case_refusals(name: str):
    import torch

    from dlplora_triton.integrations.vllm import LoRARouteMapping

    if name == "mix-sharded-refused":
        layer, _, make_x = build_layer("row", torch.float32, fully_sharded=True)
        m, tokens, samples = mix_mapping([("mix", 2), (1, 2)], decode=False)
        return _expect(
            NotImplementedError,
            lambda: run_layer(layer, _wrapper("ours"), m, make_x(4), route=tokens, sample_route=samples),
            "fully_sharded",
        )
    if name in ("mix-embedding-refused", "mix-embedding-zero-ok"):
        layer, _, make_x = build_layer("embedding", torch.float32)
        if name == "mix-embedding-zero-ok":  # components without embedding weights: served, no LoRA there
            for slot in (0, 2):
                layer.reset_lora(slot)
        m, tokens, samples = mix_mapping([("mix", 2), (2, 3)], decode=False)
        x = make_x(5)

        def ours():
            return run_layer(layer, _wrapper("ours"), m, x, route=tokens, sample_route=samples)

        if name == "mix-embedding-refused":
            return _expect(NotImplementedError, ours, "embedding")
        out = ours()
        ref = run_layer(layer, _wrapper("cpu"), mapping([(0, 2), (2, 3)], decode=False), x)
        err = rel(out, ref, ref)
        return err < 1e-6, f"relative error {err} (mix rows get the base embedding, adapter 2 its own)"
    if name == "mix-embedding-anchor-refused":
        # "mix0" is adapter 2 alone (weight 1) in the anchor's slot (adapter 3): vLLM gathers the
        # embedding rows of adapter 3's A for those tokens, so B of adapter 2 must not be applied to them.
        layer, _, make_x = build_layer("embedding", torch.float32)
        m, tokens, samples = mix_mapping([("mix0", 2), (1, 3)], decode=False)
        x = make_x(5)
        ref = run_layer(layer, _wrapper("cpu"), mapping([(2, 2), (1, 3)], decode=False), x)
        return _refused_or_right(
            lambda: run_layer(layer, _wrapper("ours"), m, x, route=tokens, sample_route=samples),
            ref,
            "embedding",
        )
    if name == "route-embedding-plain-refused":
        # A route of one adapter at weight 1 per token, on a mapping without LoRA (the docs' form).
        layer, _, make_x = build_layer("embedding", torch.float32)
        x = make_x(3)
        route = LoRARouteMapping([[2], [1], [0]], [[1.0], [1.0], [0.0]])
        ref = run_layer(layer, _wrapper("cpu"), mapping([(2, 1), (1, 1), (0, 1)], decode=False), x)
        return _refused_or_right(
            lambda: run_layer(layer, _wrapper("ours"), mapping([(0, 3)], decode=False), x, route=route),
            ref,
            "embedding",
        )
    if name == "route-logits-refused":
        # A per-token route without a sample route: the sampled rows follow vLLM's mapping, so a route
        # whose adapters have lm_head weights fails closed.
        layer, _, make_x = build_layer("logits", torch.float32)
        route = LoRARouteMapping([[1, 3], [2, 0]], [[0.5, 0.5], [1.0, 0.0]])
        return _expect(
            NotImplementedError,
            lambda: run_layer(
                layer, _wrapper("ours"), mapping([(0, 2)], decode=False), make_x(1), route=route
            ),
            "route",
        )
    if name == "route-full-module-refused":
        return case_full_module()
    if name == "route-errors":
        layer, _, make_x = build_layer("replicated", torch.float32)
        m = mapping([(0, 2)], decode=False)

        def run(**kw):
            return lambda: run_layer(layer, _wrapper("ours"), m, make_x(2), **kw)

        good = LoRARouteMapping([[1], [2]], [[1.0], [1.0]])
        checks = [
            _expect(KeyError, run(route=LoRARouteMapping([[9], [1]], [[1.0], [1.0]])), "9"),
            _expect(ValueError, run(route=LoRARouteMapping([[1]], [[1.0]])), "tokens"),
            _expect(ValueError, run(route=LoRARouteMapping([[1], [2]], [[float("nan")], [1.0]])), "finite"),
            _expect(TypeError, run(route=[[1], [2]]), "LoRARouteMapping"),
            # The mix part: a mix's sampled rows name their components too.
            _expect(KeyError, run(route=good, sample_route=LoRARouteMapping([[1, 77]], [[0.5, 0.5]])), "77"),
            _expect(
                ValueError,
                run(route=good, sample_route=LoRARouteMapping([[1], [2]], [[0.5], [0.5]])),
                "sampled rows",
            ),
            _expect(
                ValueError,
                run(route=good, sample_route=LoRARouteMapping([[1, 3]], [[0.5, float("inf")]])),
                "finite",
            ),
        ]
        return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)
    raise ValueError(name)


def case_full_module():
    """apply_lora_full_linear (modules_to_save heads, which vLLM selects per sampled row by the mapping's
    slot): served as PunicaWrapperCPU where the sample route is the mapping's, refused where a row's
    route or mapping slot has a full module and the two differ."""
    import torch

    from dlplora_triton.integrations.vllm import LoRARouteMapping

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(len(SLOTS), 1, 6, K, generator=g)
    bias = torch.randn(len(SLOTS), 6, generator=g)
    enabled = torch.tensor([True, False, True, False])  # adapters 1 and 3 have full modules
    x = torch.randn(3, K, generator=g)

    def run(wrapper, requests, sample_route=None):
        kw = {} if sample_route is None else {"sample_route": sample_route}
        wrapper.update_metadata(mapping(requests, True), list(SLOTS), len(SLOTS) + 1, VOCAB, **kw)
        y = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
        wrapper.apply_lora_full_linear(y, x, weight, bias, enabled)
        return y

    requests = [(1, 1), (2, 1), (0, 1)]
    ref = run(_wrapper("cpu"), requests)
    checks = []
    for label, route in (
        ("no sample route", None),
        ("the mapping's own sample route", LoRARouteMapping([[1], [2], [0]], [[1.0], [1.0], [0.0]])),
        ("a mix of adapters without full modules", LoRARouteMapping([[1], [2], [0]], [[1.0], [0.5], [0.0]])),
    ):
        err = rel(run(_wrapper("ours"), requests, route), ref, ref)
        checks.append((err < 1e-6, f"{label}: served, relative error {err}"))
    for label, reqs, route in (
        (
            "a mix of adapter 3",
            requests,
            LoRARouteMapping([[1, 0], [2, 3], [0, 0]], [[1, 0], [0.5, 0.5], [0, 0]]),
        ),
        (
            "adapter 1 routed onto a row without LoRA",
            [(0, 1), (2, 1), (0, 1)],
            LoRARouteMapping([[1], [2], [0]], [[1.0], [1.0], [0.0]]),
        ),
        (
            "no LoRA routed onto adapter 1's row",
            requests,
            LoRARouteMapping([[0], [2], [0]], [[0.0], [1.0], [0.0]]),
        ),
    ):
        ok, detail = _expect(
            NotImplementedError, lambda: run(_wrapper("ours"), reqs, route), "modules_to_save"
        )
        checks.append((ok, f"{label}: {detail}"))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def case_slot_ranks():
    """The wrapper reads each slot's rank from the zero padding of vLLM's A stack, reads it again after
    every write into the stack (an adapter replaced in its slot, a slot emptied), and the delta it
    computes with those ranks equals the one over the full padded rank."""
    import torch

    from dlplora_triton.ops import fused_lora_planned, prepare_batch

    checks = []
    wrapper = _wrapper("ours")
    gen = torch.Generator().manual_seed(5)
    a_stacked = torch.zeros(3, 1, R, K)  # vLLM's [L, 1, R, K]
    b_stacked = torch.randn(3, 1, N, R, generator=gen)  # B beyond a rank is ignored too
    a_stacked[0, 0, :5] = torch.randn(5, K, generator=gen)
    a_stacked[2, 0, :R] = torch.randn(R, K, generator=gen)
    a_stacked[2, 0, 7] = 0  # a zero row inside the rank: the rank is one past the last non-zero row
    a = a_stacked[:, 0]
    seen = wrapper._slot_ranks(a).tolist()
    checks.append((seen == [5, 0, R], f"ranks {seen}, expected [5, 0, {R}]"))
    a_stacked[1, 0, :3] = torch.randn(3, K, generator=gen)  # set_lora into slot 1 (in place)
    a_stacked[0] = 0  # reset_lora of slot 0
    seen = wrapper._slot_ranks(a_stacked[:, 0]).tolist()
    checks.append((seen == [0, 3, R], f"ranks after writes {seen}, expected [0, 3, {R}]"))
    x = torch.randn(6, K, generator=gen)
    ids = torch.tensor([[1, 2], [2, -1], [1, -1]])
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [-1.0, 0.0]])
    batch = prepare_batch(torch.tensor([0, 2, 4, 6]), ids, weights, 3, num_tokens=6)
    b = b_stacked[:, 0]
    full = fused_lora_planned(x, a_stacked[:, 0], b, batch)
    ranked = fused_lora_planned(x, a_stacked[:, 0], b, batch, ranks=wrapper._slot_ranks(a_stacked[:, 0]))
    err = float((full - ranked).abs().max())
    checks.append((err < 1e-5, f"delta with the slots' ranks differs from the padded one by {err:.2e}"))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def case_zero_tokens():
    """A 0-token LoRAMapping (vLLM's test_lora_manager.py sends one) and an empty batch's routes are
    accepted; layers then run 0 rows unchanged, padded rows without LoRA, and the next step as vLLM."""
    import torch
    from vllm.lora.layers import LoRAMapping

    from dlplora_triton.integrations.vllm import LoRARouteMapping

    checks = []
    wrapper = _wrapper("ours")
    empty = lambda: LoRARouteMapping(torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, 1))  # noqa: E731
    for label, m, kw in (
        ("LoRAMapping([], [])", LoRAMapping([], []), {}),
        ("LoRAMapping([], [], is_prefill=True)", LoRAMapping([], [], is_prefill=True), {}),
        ("an empty batch's [0, 1] routes", LoRAMapping([], []), dict(route=empty(), sample_route=empty())),
        (
            "LoRARouteMapping([], [])",
            LoRAMapping([], []),
            dict(route=LoRARouteMapping([], []), sample_route=LoRARouteMapping([], [])),
        ),
    ):
        try:
            wrapper.update_metadata(m, list(SLOTS), len(SLOTS) + 1, VOCAB, **kw)
            checks.append((True, f"{label} accepted"))
        except Exception as e:
            checks.append((False, f"{label}: {type(e).__name__}: {e}"))
    for kind in ("replicated", "qkv", "row", "embedding", "logits"):
        layer, slices, make_x = build_layer(kind, torch.float32)
        for kw in ({}, dict(route=empty(), sample_route=empty())):
            try:
                out = run_layer(layer, _wrapper("ours"), LoRAMapping([], []), make_x(0), **kw)
                width = VOCAB if kind == "logits" else sum(slices)
                ok = tuple(out.shape) == (0, width)
                checks.append((ok, f"{kind}{' (routes)' if kw else ''}: 0 rows -> {tuple(out.shape)}"))
            except Exception as e:
                checks.append((False, f"{kind}{' (routes)' if kw else ''}: {type(e).__name__}: {e}"))
    # The wrapper's own calls on 0 rows leave their (empty) outputs as they are.
    layer, _, _ = build_layer("replicated", torch.float32)
    wrapper.update_metadata(LoRAMapping([], []), list(SLOTS), len(SLOTS) + 1, VOCAB)
    y = torch.zeros(0, N)
    try:
        wrapper.add_lora_linear(y, torch.zeros(0, K), layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (N,))
        checks.append((tuple(y.shape) == (0, N), "add_lora_linear on 0 rows"))
    except Exception as e:
        checks.append((False, f"add_lora_linear on 0 rows: {type(e).__name__}: {e}"))
    # After an empty step: rows beyond the mapping (vLLM pads) get no LoRA, and the next step is served.
    layer, _, make_x = build_layer("replicated", torch.float32)
    x = make_x(4)
    base = run_layer(layer, _wrapper("cpu"), mapping([(0, 4)], decode=False), x)
    padded = run_layer(layer, wrapper, LoRAMapping([], []), x)
    checks.append((rel(padded, base, base) < 1e-6, "rows padded onto an empty mapping are the base output"))
    m = mapping([(1, 2), (3, 2)], decode=False)
    ref = run_layer(layer, _wrapper("cpu"), m, x)
    err = rel(run_layer(layer, wrapper, m, x), ref, ref - base)
    checks.append((err < 1e-5, f"the next step: relative error {err}"))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def _peft_dir(root: str, name: str, r: int = 4, truncate: bool = False) -> str:
    """A tiny PEFT-style adapter directory: adapter_config.json and a valid adapter_model.safetensors
    (cut short when ``truncate``)."""
    import torch
    from safetensors.torch import save_file

    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"]}, f)
    prefix = "base_model.model.q_proj"
    weights = os.path.join(path, "adapter_model.safetensors")
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(r, K), f"{prefix}.lora_B.weight": torch.zeros(N, r)}, weights
    )
    if truncate:
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size - 16)
    return path


def case_plugin():
    import warnings

    os.environ.pop("VLLM_PLUGINS", None)
    import torch
    from vllm.config.scheduler import SchedulerConfig
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    from dlplora_triton.integrations import vllm as dlp_vllm
    from dlplora_triton.integrations.vllm import PunicaWrapperDLP

    load_general_plugins()
    wrapper = get_punica_wrapper(
        64, max_batches=8, device=torch.device("cpu"), lora_config=_lora_config(torch.float32)
    )
    hook = type(current_platform).get_punica_wrapper
    dlp_vllm.register()  # again: a no-op
    checks = [
        (type(wrapper) is PunicaWrapperDLP, f"get_punica_wrapper() -> {type(wrapper).__name__}"),
        (type(current_platform).get_punica_wrapper == hook, "register() twice changes nothing"),
        (
            getattr(SchedulerConfig.get_scheduler_cls, "_dlplora", False),
            "register() installs the engine hooks",
        ),
    ]
    for version, tested in (("0.40.0", False), ("0.33.0", True), ("0.33.1+cpu", True), ("0.32.2", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = dlp_vllm.check_vllm_version(version)
        warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        ok = result is tested and len(warned) == (0 if tested else 1)
        if warned:
            ok = ok and version in str(warned[0].message)
        checks.append((ok, f"check_vllm_version({version!r}) -> {result}, {len(warned)} RuntimeWarning"))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def case_engine_hooks():
    """install_engine_hooks() once; the scheduler vLLM picks counts mix slots; arrival checks refuse."""
    import torch
    from vllm import SamplingParams
    from vllm.config.lora import LoRAConfig
    from vllm.config.scheduler import SchedulerConfig
    from vllm.lora.request import LoRARequest
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    from dlplora_triton.integrations.vllm import engine, mix_request, mixes

    engine.install_engine_hooks()
    again = engine.install_engine_hooks()
    hooked = (
        SchedulerConfig.get_scheduler_cls,
        EngineCore.preprocess_add_request,
        LoRAModelRunnerMixin.set_active_loras,
    )
    checks = [
        (again is False, "install_engine_hooks() a second time installs nothing"),
        (
            all(h.__module__ == engine.__name__ for h in hooked),
            "get_scheduler_cls, preprocess_add_request and set_active_loras are the hooks",
        ),
    ]

    class MyScheduler(Scheduler):
        pass

    for label, kw, base, other in (
        ("sync", dict(async_scheduling=False), Scheduler, AsyncScheduler),
        ("async", dict(async_scheduling=True), AsyncScheduler, None),
        ("user class", dict(scheduler_cls=MyScheduler), MyScheduler, AsyncScheduler),
    ):
        cls = SchedulerConfig.default_factory(**kw).get_scheduler_cls()
        same = SchedulerConfig.default_factory(**kw).get_scheduler_cls()
        mro = cls.__mro__
        ok = (
            issubclass(cls, base)
            and issubclass(cls, engine.MixSlotsScheduler)
            and (other is None or not issubclass(cls, other))
            and mro.index(engine.MixSlotsScheduler) < mro.index(base)
            and cls is same
            and engine.mix_slots_scheduler(cls) is cls
        )
        checks.append((ok, f"{label}: {cls.__name__} ({', '.join(c.__name__ for c in mro[:4])}, ...)"))

    root = tempfile.mkdtemp()
    req = {
        name: LoRARequest(name, i + 1, _peft_dir(root, name, r=r, truncate=name == "cut"))
        for i, (name, r) in enumerate((("a", 4), ("b", 8), ("c", 4), ("big", 16), ("cut", 4)))
    }
    gone = LoRARequest("gone", 9, os.path.join(root, "gone"))
    cfg = LoRAConfig(max_loras=2, max_lora_rank=8, lora_dtype=torch.float32)
    anchor, params = mix_request([(req["a"], 0.7), (req["b"], 0.3)], SamplingParams(max_tokens=4))
    try:
        engine.check_mix_request(params, anchor, cfg)
        engine.check_mix_request(SamplingParams(max_tokens=4), req["big"], cfg)  # plain: not checked here
        checks.append((True, "a good mix and a plain request pass"))
    except Exception as e:
        checks.append((False, f"a good mix or a plain request refused: {type(e).__name__}: {e}"))

    def refuse(components, words, lora=None, config=cfg, exc=ValueError):
        anchor, params = mix_request([(req[n] if isinstance(n, str) else n, w) for n, w in components])
        lora = anchor if lora is None else lora
        return _expect(exc, lambda: engine.check_mix_request(params, lora, config), words)

    for ok, detail in (
        refuse([("a", 0.5), ("b", 0.3), ("c", 0.2)], "max_loras"),
        refuse([("a", 0.7), ("b", 0.3)], "anchor", lora=req["b"]),
        refuse([("a", 0.7), ("b", 0.3)], "anchor", lora=LoRARequest("x", 7, req["a"].lora_path)),
        refuse([("a", 0.5), (gone, 0.5)], "gone", exc=(OSError, ValueError)),
        refuse([("a", 0.5), ("big", 0.5)], "max_lora_rank"),
        refuse([("cut", 0.5), ("a", 0.5)], "truncated"),
        refuse([("a", 0.5), ("b", 0.5)], "LoRA", config=None),
    ):
        checks.append((ok, detail))
    checks.append(_expect(ValueError, lambda: engine.check_mix_request(params, None, cfg), "anchor"))
    # A client's own mix argument (no signature, or another path under a copied one) is refused
    # before any path is read, and so is a weight outside [-1000, 1000].
    text = params.extra_args[mixes.MIX_ARG]
    for label, extra in (
        ("unsigned", {mixes.MIX_ARG: text}),
        ("re-pointed", dict(params.extra_args, **{mixes.MIX_ARG: text.replace(req["b"].lora_path, root)})),
    ):
        forged = SamplingParams(max_tokens=4, extra_args=extra)
        ok, detail = _expect(ValueError, lambda: engine.check_mix_request(forged, anchor, cfg), "signature")
        checks.append((ok, f"{label}: {detail}"))
    checks.append(_expect(ValueError, lambda: mix_request([(req["a"], 1e30)]), "outside"))
    return all(ok for ok, _ in checks), "; ".join(str(d) for _, d in checks)


def _peft_adapters(twin, root: str) -> dict[str, str]:
    """Three PEFT adapters of ``twin`` (ranks 8, 4, 16, different alphas), random A and B, saved."""
    import copy
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    paths = {}
    specs = {
        "math": dict(r=8, lora_alpha=16),
        "code": dict(r=4, lora_alpha=4),
        "de": dict(r=16, lora_alpha=8),
    }
    for i, (name, cfg) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(
                copy.deepcopy(twin), LoraConfig(target_modules=["q_proj", "o_proj"], **cfg)
            )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_()
        paths[name] = os.path.join(root, name)
        model.save_pretrained(paths[name])
    return paths


def _route_rows(requests):
    """Token and sampled-row routes of a prefill step, built from each request's LoRA and the mix its
    sampling parameters carry (request_mix), as the engine's worker hook does."""
    from dlplora_triton.integrations.vllm import LoRARouteMapping
    from dlplora_triton.integrations.vllm.mixes import request_mix

    rows = []
    for lora, params, n in requests:
        mix = request_mix(params) if params is not None else None
        if mix:
            rows.append(([c.lora_int_id for c in mix], [c.weight for c in mix], n))
        else:
            lid = lora.lora_int_id if lora is not None else 0
            rows.append(([lid], [1.0 if lid else 0.0], n))
    width = max(len(ids) for ids, _, _ in rows)
    rows = [(ids + [0] * (width - len(ids)), w + [0.0] * (width - len(w)), n) for ids, w, n in rows]
    tokens = LoRARouteMapping(
        [i for i, _, n in rows for _ in range(n)], [w for _, w, n in rows for _ in range(n)]
    )
    samples = LoRARouteMapping([i for i, _, _ in rows], [w for _, w, _ in rows])
    return tokens, samples


def case_manager_peft():
    """End to end through vLLM's LoRA managers: PEFT adapters loaded from disk by vLLM into slots, our
    wrapper from get_punica_wrapper(), mixes made by mix_request (two sharing a component) and routed
    by next_step_routes over two steps, then a plain step, against PEFT's "cat" merge."""
    import copy
    import warnings

    import torch
    from peft import PeftModel
    from torch import nn
    from vllm import SamplingParams
    from vllm.config import get_current_vllm_config
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

    from dlplora_triton.integrations import vllm as dlp_vllm
    from dlplora_triton.integrations.vllm import mix_request
    from dlplora_triton.integrations.vllm.mixes import request_mix
    from dlplora_triton.integrations.vllm.wrapper import next_step_routes

    dlp_vllm.register()

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(K, N, bias=False)
            self.o_proj = nn.Linear(N, K, bias=False)

        def forward(self, x):
            return self.o_proj(self.q_proj(x))

    class Tiny(nn.Module):
        supports_lora = True
        packed_modules_mapping: dict = {}
        embedding_modules: dict = {}

        def __init__(self, twin):
            super().__init__()
            self.config = None  # vLLM passes the model's HF config to the LoRA layers (unused by these)
            self.q_proj = ReplicatedLinear(K, N, bias=False, params_dtype=torch.float32, prefix="q_proj")
            self.o_proj = RowParallelLinear(N, K, bias=False, params_dtype=torch.float32, prefix="o_proj")
            for name in ("q_proj", "o_proj"):
                getattr(self, name).weight.data.copy_(getattr(twin, name).weight.data)
                _finish(getattr(self, name))

        def forward(self, x):
            return self.o_proj(self.q_proj(x)[0])[0]

    torch.manual_seed(0)
    twin = Twin()
    paths = _peft_adapters(twin, tempfile.mkdtemp())
    model = Tiny(twin)
    cfg = LoRAConfig(max_loras=3, max_lora_rank=16, lora_dtype=torch.float32, max_cpu_loras=8)
    manager = LRUCacheLoRAModelManager(
        model, 8, 64, VOCAB, cfg, torch.device("cpu"), get_current_vllm_config()
    )
    wrapper = next(iter(manager.punica_wrapper_mapping.values()))
    worker = LRUCacheWorkerLoRAManager.__new__(LRUCacheWorkerLoRAManager)
    worker.__dict__.update(
        _lora_model_cls=LoRAModel,
        embedding_modules={},
        _cached_dummy_lora=False,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        vocab_size=VOCAB,
        lora_config=cfg,
        max_position_embeddings=None,
        device=torch.device("cpu"),
        _adapter_manager=manager,
    )
    req = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(paths.items())}
    mixes = {
        "m1": [("math", 0.7), ("code", -0.4)],
        "m2": [("math", 0.5), ("de", 0.5)],  # shares math with m1: math is read once per launch
        "m3": [("de", 1.5), ("code", 0.25)],
    }
    made = {
        key: mix_request([(req[n], w) for n, w in pairs], SamplingParams(max_tokens=4))
        for key, pairs in mixes.items()
    }
    checks = []
    for key, (anchor, params) in made.items():
        comps = request_mix(params)
        first = req[mixes[key][0][0]]
        ok = (
            anchor.lora_int_id == first.lora_int_id
            and anchor.lora_path == first.lora_path
            and anchor.lora_name == "mix:" + ",".join(f"{n}={w!r}" for n, w in mixes[key])
            and [(c.name, c.lora_int_id, c.weight) for c in comps]
            == [(n, req[n].lora_int_id, w) for n, w in mixes[key]]
        )
        checks.append((ok, f"{key}: anchor {anchor.lora_name} id {anchor.lora_int_id}"))

    def request(key):
        if key is None:
            return None, None
        if key in made:
            return made[key]
        return req[key], SamplingParams(max_tokens=4)

    def step(rows, mixed: bool):
        """One step: vLLM's manager activates the adapters; the wrapper gets the step's routes."""
        batch = [(*request(k), n) for k, n in rows]
        m = mapping([(lora.lora_int_id if lora else 0, n) for lora, _, n in batch], decode=False)
        # The step's requests (anchors included, as vLLM passes them) and every mix component.
        adapters = {lora.lora_int_id: lora for lora, _, _ in batch if lora}
        for _, params, _ in batch:
            for c in request_mix(params) or () if params is not None else ():
                adapters.setdefault(c.lora_int_id, LoRARequest(c.name, c.lora_int_id, c.lora_path))
        if mixed:
            manager._last_mapping = None  # as the engine hook: routes change with weights alone
            with next_step_routes(*_route_rows(batch)):
                worker.set_active_adapters(list(adapters.values()), m)
        else:
            worker.set_active_adapters(list(adapters.values()), m)
        x = torch.randn(sum(n for _, n in rows), K)
        with torch.no_grad():
            return x, model(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(twin), paths["math"], adapter_name="math")
        for name in ("code", "de"):
            peft.load_adapter(paths[name], adapter_name=name)
        for key, pairs in mixes.items():
            peft.add_weighted_adapter(
                [n for n, _ in pairs], [w for _, w in pairs], adapter_name=key, combination_type="cat"
            )
    for m in peft.modules():
        for key in mixes:
            if isinstance(getattr(m, "scaling", None), dict) and key in m.scaling:
                m.scaling[key] = 1.0  # "cat" folds weights and scales into B (see tests/peft_helpers.py)

    def reference(rows, x):
        ref, start = torch.empty(x.shape[0], K), 0
        with torch.no_grad():
            for key, n in rows:
                xs = x[start : start + n]
                if key is None:
                    with peft.disable_adapter():
                        ref[start : start + n] = peft(xs)
                else:
                    peft.set_adapter(key)
                    ref[start : start + n] = peft(xs)
                start += n
            return ref, twin(x)

    steps = (
        ([("m1", 3), ("de", 2), (None, 1), ("m2", 2), ("m1", 1), ("math", 2)], True),
        ([("m3", 2), ("code", 1), ("m1", 2)], True),  # other weights, same adapters in slots
        ([("de", 2), ("math", 1)], False),  # a plain step after mixed ones: no route lingers
    )
    for i, (rows, mixed) in enumerate(steps):
        x, ours = step(rows, mixed)
        ref, base = reference(rows, x)
        err = rel(ours, ref, ref - base)
        checks.append((err < 1e-5, f"step {i + 1}: relative error {err} against PEFT 'cat'"))
    slots = sorted(i for i in manager.lora_index_to_id if i is not None)
    checks.append((type(wrapper).__name__ == "PunicaWrapperDLP", f"wrapper {type(wrapper).__name__}"))
    checks.append((slots == [1, 2, 3], f"slots {slots} (the three adapters; mixes take none)"))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def _tp2_worker(rank: int, port: int, out_dir: str) -> None:
    _env()
    import torch

    torch.set_num_threads(1)
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        _init_dist(2, rank, port)
        torch.save(_tp_outputs(), os.path.join(out_dir, f"rank{rank}.pt"))


def _tp_outputs() -> dict:
    """Outputs of the column / row layers with our wrapper (plain and mixed steps), this TP size."""
    import torch
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    requests = [("mix", 3), (2, 2), (0, 1), (1, 2)]
    results = {}
    for kind in ("column", "row"):
        layer, _, make_x = build_layer(kind, torch.float32, seed=3)
        x = make_x(8)
        if kind == "row":  # input is parallel: each rank takes its K shard
            x = x.chunk(tp, dim=1)[rank].contiguous()
        plain = mapping([(0 if k in MIXES else k, n) for k, n in requests], False)
        results[f"{kind}-plain"] = run_layer(layer, _wrapper("ours"), plain, x)
        m, tokens, samples = mix_mapping(requests, False)
        results[f"{kind}-mix"] = run_layer(layer, _wrapper("ours"), m, x, route=tokens, sample_route=samples)
        results[f"{kind}-base"] = run_layer(layer, _wrapper("ours"), mapping([(0, 8)], False), x)
    return results


def case_tp2():
    import torch
    import torch.multiprocessing as mp

    single = _tp_outputs()
    out_dir = tempfile.mkdtemp()
    mp.spawn(_tp2_worker, args=(_free_port(), out_dir), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    errs = {}
    for key, ref in single.items():
        if key.endswith("-base"):
            continue
        base = single[key.split("-")[0] + "-base"]
        for r, res in enumerate(ranks):
            errs[f"{key}@rank{r}"] = rel(res[key], ref, ref - base)
    # The mixed outputs differ from the plain ones (else the mix part would test nothing).
    gaps = {
        kind: rel(
            single[f"{kind}-mix"], single[f"{kind}-plain"], single[f"{kind}-mix"] - single[f"{kind}-base"]
        )
        for kind in ("column", "row")
    }
    ok = all(e < 1e-5 for e in errs.values()) and all(g > 1e-2 for g in gaps.values())
    return ok, f"TP=2 vs TP=1 relative errors {errs}; mix vs plain {gaps}"


def run_case(name: str):
    parts = name.split("-")
    if parts[0] == "plain":
        if name == "plain-replicated-fp16":
            return case_plain("replicated", "prefill", "fp16")
        if name == "plain-qkv-ours-triton":
            return case_plain("qkv", "prefill", ours_backend="triton")
        if name == "plain-row-sharded":
            return case_plain("row", "sharded")
        if name == "plain-padded-tokens":
            return case_padded()
        return case_plain(parts[1], parts[2])
    if name == "mix-qkv-ours-triton":
        return case_mix("qkv", "prefill", ours_backend="triton")
    if name in (
        "mix-sharded-refused",
        "mix-embedding-refused",
        "mix-embedding-zero-ok",
        "mix-embedding-anchor-refused",
        "route-logits-refused",
        "route-embedding-plain-refused",
        "route-full-module-refused",
        "route-errors",
    ):
        return case_refusals(name)
    if parts[0] == "mix":
        return case_mix(parts[1], parts[2])
    if parts[0] == "route":
        return case_route(parts[1])
    return {
        "zero-tokens": case_zero_tokens,
        "slot-ranks": case_slot_ranks,
        "plugin": case_plugin,
        "engine-hooks": case_engine_hooks,
        "manager-peft": case_manager_peft,
        "tp2": case_tp2,
    }[name]()


def main(argv: list[str]) -> int:
    _env()
    import torch

    torch.set_num_threads(1)
    from vllm.config import VllmConfig, set_current_vllm_config

    out_path, names = argv[0], argv[1:] or list(CASES)
    results = {}
    with set_current_vllm_config(VllmConfig()):
        _init_dist(1, 0, _free_port())
        for name in names:
            start = time.perf_counter()
            try:
                ok, detail = run_case(name)
            except Exception:
                ok, detail = False, traceback.format_exc()
            results[name] = {
                "ok": bool(ok),
                "detail": detail,
                "seconds": round(time.perf_counter() - start, 2),
            }
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({results[name]['seconds']} s)", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    # Run as a script (sys.path[0] = tests/), not with the repository root on sys.path: a stale
    # dlplora_triton.egg-info there (left by wheel builds) would hide the installed entry points.
    sys.exit(main(sys.argv[1:]))
