"""vLLM checks of dlplora_triton.integrations.vllm, run in a process of their own by tests/test_vllm.py.

vLLM's real LoRA layer classes (replicated, merged column, QKV, row parallel, embedding, logits) run
with our wrapper swapped in and with vLLM's own wrappers (``PunicaWrapperCPU``, and
``PunicaWrapperGPU``'s Triton ops in the interpreter) on the same weights and mappings; mixes and
per-token routes are checked against the weighted sum of the components' deltas served by vLLM's own
wrapper one adapter at a time; TP = 2 over gloo in two processes against TP = 1.

    python tests/vllm_checks.py OUT.json [CASE ...]     # every case when none is named

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
    + ["route-replicated", "route-qkv", "route-logits-refused", "route-errors"]
    + ["plugin", "resolver", "worker-hooks", "manager-peft", "tp2"]
)

K, N, R, VOCAB = 64, 40, 16, 96
RANKS = {1: 8, 2: 3, 3: 16}  # lora id -> rank (mixed ranks; zero-padded to R by vLLM)
SLOTS = [1, 2, 3, None]  # lora_index_to_id: 4 slots, one free
MIX_ID = 50  # a mix of 1 and 3
MIX = ((1, 0.7), (3, -0.45))


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


def run_layer(layer, wrapper, m, x, route=None, slots=SLOTS):
    """The layer's output with ``wrapper`` set on ``mapping`` m."""
    kwargs = {} if route is None else {"route": route}
    wrapper.update_metadata(m, list(slots), len(slots) + 1, VOCAB, **kwargs)
    layer.set_mapping(wrapper)
    if hasattr(layer, "_test_head"):
        return layer._get_logits(x, layer._test_head).clone()
    out = layer(x)
    return (out[0] if isinstance(out, tuple) else out).clone()


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


def _mix_reference(layer, make_x, decode: bool, x, components, requests):
    """base + sum_c w_c * delta_c, each delta served by PunicaWrapperCPU with plain mappings."""
    base_map = mapping([(0, n) for _, n in requests], decode)
    base = run_layer(layer, _wrapper("cpu"), base_map, x)
    total = base.double().clone()
    for cid, w in components:
        # Requests that name the mix get component cid; plain requests keep their own adapter once.
        m = mapping([(cid if lid == MIX_ID else 0, n) for lid, n in requests], decode)
        total += w * (run_layer(layer, _wrapper("cpu"), m, x).double() - base.double())
    plain = mapping([(0 if lid == MIX_ID else lid, n) for lid, n in requests], decode)
    total += run_layer(layer, _wrapper("cpu"), plain, x).double() - base.double()
    return base, total


def case_mix(layer_kind: str, phase: str, ours_backend: str | None = None):
    import torch

    from dlplora_triton.integrations import vllm_mix

    dtype = torch.float32
    layer, _, make_x = build_layer(layer_kind, dtype)
    decode = phase == "decode"
    slots = [1, 2, 3, MIX_ID]
    requests = [(MIX_ID, 3), (2, 2), (0, 1), (MIX_ID, 2), (1, 3)]
    m = mapping(requests, decode)
    rows = len(m.prompt_mapping) if layer_kind == "logits" else len(m.index_mapping)
    x = make_x(rows)
    vllm_mix.register_mix(MIX_ID, MIX)
    try:
        ours = run_layer(layer, _wrapper("ours", backend=ours_backend), m, x, slots=slots)
    finally:
        vllm_mix.unregister_mix(MIX_ID)
    base, ref = _mix_reference(layer, make_x, decode, x, MIX, requests)
    err = rel(ours, ref, ref - base.double())
    return err < 1e-5, f"relative error {err} against the weighted sum of vLLM's per-adapter deltas"


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
    try:
        fn()
    except exc_type as e:
        if words.lower() not in str(e).lower():
            return False, f"{exc_type.__name__} raised but its message lacks {words!r}: {e}"
        return True, f"{exc_type.__name__}: {e}"
    return False, f"no {exc_type.__name__} raised"


def case_refusals(name: str):
    import torch

    from dlplora_triton.integrations import vllm_mix
    from dlplora_triton.integrations.vllm import LoRARouteMapping

    slots = [1, 2, 3, MIX_ID]
    if name == "mix-sharded-refused":
        layer, _, make_x = build_layer("row", torch.float32, fully_sharded=True)
        vllm_mix.register_mix(MIX_ID, MIX)
        try:
            m = mapping([(MIX_ID, 2), (1, 2)], decode=False)
            return _expect(
                NotImplementedError,
                lambda: run_layer(layer, _wrapper("ours"), m, make_x(4), slots=slots),
                "fully_sharded",
            )
        finally:
            vllm_mix.unregister_mix(MIX_ID)
    if name in ("mix-embedding-refused", "mix-embedding-zero-ok"):
        layer, _, make_x = build_layer("embedding", torch.float32)
        if name == "mix-embedding-zero-ok":  # components without embedding weights: served, no LoRA there
            for slot in (0, 2):
                layer.reset_lora(slot)
        vllm_mix.register_mix(MIX_ID, MIX)
        try:
            m = mapping([(MIX_ID, 2), (2, 3)], decode=False)
            x = make_x(5)
            if name == "mix-embedding-refused":
                return _expect(
                    NotImplementedError,
                    lambda: run_layer(layer, _wrapper("ours"), m, x, slots=slots),
                    "embedding",
                )
            ours = run_layer(layer, _wrapper("ours"), m, x, slots=slots)
        finally:
            vllm_mix.unregister_mix(MIX_ID)
        ref = run_layer(layer, _wrapper("cpu"), mapping([(0, 2), (2, 3)], decode=False), x, slots=slots)
        err = rel(ours, ref, ref)
        return err < 1e-6, f"relative error {err} (mix rows get the base embedding, adapter 2 its own)"
    if name == "route-logits-refused":
        layer, _, make_x = build_layer("logits", torch.float32)
        route = LoRARouteMapping([[1, 3], [2, 0]], [[0.5, 0.5], [1.0, 0.0]])
        return _expect(
            NotImplementedError,
            lambda: run_layer(
                layer, _wrapper("ours"), mapping([(0, 2)], decode=False), make_x(1), route=route
            ),
            "route",
        )
    if name == "route-errors":
        layer, _, make_x = build_layer("replicated", torch.float32)
        m = mapping([(0, 2)], decode=False)
        checks = [
            _expect(
                KeyError,
                lambda: run_layer(
                    layer, _wrapper("ours"), m, make_x(2), route=LoRARouteMapping([[9], [1]], [[1.0], [1.0]])
                ),
                "9",
            ),
            _expect(
                ValueError,
                lambda: run_layer(
                    layer, _wrapper("ours"), m, make_x(2), route=LoRARouteMapping([[1]], [[1.0]])
                ),
                "tokens",
            ),
            _expect(
                ValueError,
                lambda: run_layer(
                    layer,
                    _wrapper("ours"),
                    m,
                    make_x(2),
                    route=LoRARouteMapping([[1], [2]], [[float("nan")], [1.0]]),
                ),
                "finite",
            ),
        ]
        vllm_mix.register_mix(MIX_ID, ((1, 0.5), (77, 0.5)))
        try:
            mm = mapping([(MIX_ID, 2)], decode=False)
            checks.append(
                _expect(
                    KeyError,
                    lambda: run_layer(layer, _wrapper("ours"), mm, make_x(2), slots=[1, 2, 3, MIX_ID]),
                    "77",
                )
            )
        finally:
            vllm_mix.unregister_mix(MIX_ID)
        checks.append(
            _expect(ValueError, lambda: vllm_mix.register_mix(MIX_ID, [(1, 0.5), (1, 0.5)]), "twice")
        )
        return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)
    raise ValueError(name)


def _peft_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, f)
    return path


def case_plugin():
    os.environ.pop("VLLM_PLUGINS", None)
    root = tempfile.mkdtemp()
    _peft_dir(root, "math")
    os.environ["DLPLORA_VLLM_ADAPTER_DIR"] = root
    import torch
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.lora.resolver import LoRAResolverRegistry
    from vllm.plugins import load_general_plugins

    from dlplora_triton.integrations.vllm import PunicaWrapperDLP

    load_general_plugins()
    wrapper = get_punica_wrapper(
        64, max_batches=8, device=torch.device("cpu"), lora_config=_lora_config(torch.float32)
    )
    ok = type(wrapper) is PunicaWrapperDLP and "dlplora-mix" in LoRAResolverRegistry.get_supported_resolvers()
    return (
        ok,
        f"get_punica_wrapper() -> {type(wrapper).__name__}; resolvers {sorted(LoRAResolverRegistry.get_supported_resolvers())}",
    )


def case_resolver():
    import asyncio

    from dlplora_triton.integrations import vllm_mix

    root = tempfile.mkdtemp()
    mix_root = tempfile.mkdtemp()
    for name in ("math", "code"):
        _peft_dir(root, name)
    resolver = vllm_mix.make_resolver(root, mix_root)
    req = asyncio.run(resolver.resolve_lora("base", "mix:math=0.7,code=0.3"))
    again = asyncio.run(resolver.resolve_lora("base", "mix:math=0.7,code=0.3"))
    other = asyncio.run(resolver.resolve_lora("base", "mix:math=0.6,code=0.4"))
    comps = vllm_mix.read_mix_dir(req.lora_path)
    checks = [
        (
            asyncio.run(resolver.resolve_lora("base", "math")) is None,
            "a plain name is left to other resolvers",
        ),
        (
            req.lora_path == again.lora_path and req.lora_int_id == again.lora_int_id,
            "same mix, same path and id",
        ),
        (other.lora_path != req.lora_path, "other weights, other path (prefix-cache key)"),
        ([(c["name"], c["weight"]) for c in comps] == [("math", 0.7), ("code", 0.3)], f"components {comps}"),
        (
            comps[0]["lora_int_id"] == vllm_mix.component_id(os.path.join(root, "math")),
            "stable component ids",
        ),
    ]
    for bad, exc, words in (
        ("mix:math", ValueError, "adapter=weight"),
        ("mix:nope=1", FileNotFoundError, "nope"),
        ("mix:math=1,math=2", ValueError, "twice"),
    ):
        checks.append(_expect(exc, lambda bad=bad: resolver.request_for(bad), words))
    return all(ok for ok, _ in checks), "; ".join(d for _, d in checks)


def case_worker_hooks():
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from dlplora_triton.integrations import vllm_mix

    vllm_mix.install_worker_hooks()
    again = vllm_mix.install_worker_hooks()
    root = tempfile.mkdtemp()
    math = LoRARequest("math", 1, _peft_dir(root, "math"))
    code = LoRARequest("code", 2, _peft_dir(root, "code"))
    mix = vllm_mix.mix_request([(math, 0.7), (code, 0.3)], mix_dir=tempfile.mkdtemp())

    class Slots:
        lora_slots = 4

    manager = LRUCacheWorkerLoRAManager.__new__(LRUCacheWorkerLoRAManager)
    manager._adapter_manager = Slots()
    added = []
    manager.add_adapter = lambda request: added.append((request.lora_name, request.lora_int_id))
    manager._apply_adapters({mix, LoRARequest("code", 2, code.lora_path)})
    loaded = manager._load_adapter(mix)
    checks = [
        (again is False, "hooks installed once"),
        (
            added[:2] == [("math", 1), ("code", 2)] and added[2][1] == mix.lora_int_id and len(added) == 3,
            f"added {added}",
        ),
        (vllm_mix.mix_components(mix.lora_int_id) == ((1, 0.7), (2, 0.3)), "mix registered at load"),
        (
            loaded.id == mix.lora_int_id and list(loaded.loras) == [vllm_mix.MIX_PLACEHOLDER],
            "a mix loads as an adapter of no model module",
        ),
        (mix.lora_name == "mix:math=0.7,code=0.3", f"name {mix.lora_name}"),
    ]
    manager._adapter_manager.lora_slots = 2
    checks.append(_expect(RuntimeError, lambda: manager._apply_adapters({mix}), "slots"))
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


def case_manager_peft():
    """End to end through vLLM's LoRA managers: PEFT adapters loaded from disk by vLLM, slots, our
    wrapper from get_punica_wrapper(), two mixes sharing a component, against PEFT's "cat" merge."""
    import copy
    import warnings

    import torch
    from peft import PeftModel
    from torch import nn
    from vllm.config import get_current_vllm_config
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

    from dlplora_triton.integrations import vllm as dlp_vllm
    from dlplora_triton.integrations import vllm_mix

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
    cfg = LoRAConfig(max_loras=5, max_lora_rank=16, lora_dtype=torch.float32, max_cpu_loras=8)
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
    mix_dir = tempfile.mkdtemp()
    mixes = {
        "m1": ([("math", 0.7), ("code", -0.4)], None),
        "m2": ([("math", 0.5), ("de", 0.5)], None),  # shares math with m1: math is read once per launch
    }
    for key, (pairs, _) in mixes.items():
        mixes[key] = (pairs, vllm_mix.mix_request([(req[n], w) for n, w in pairs], mix_dir=mix_dir))
    rows = [("m1", 3), ("de", 2), (None, 1), ("m2", 2), ("m1", 1)]

    def lid(key):
        return 0 if key is None else (mixes[key][1] if key in mixes else req[key]).lora_int_id

    requests = [(lid(k), n) for k, n in rows]
    worker.set_active_adapters({mixes["m1"][1], mixes["m2"][1], req["de"]}, mapping(requests, decode=False))
    x = torch.randn(sum(n for _, n in rows), K)
    with torch.no_grad():
        ours = model(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(twin), paths["math"], adapter_name="math")
        for name in ("code", "de"):
            peft.load_adapter(paths[name], adapter_name=name)
        for key, (pairs, _) in mixes.items():
            peft.add_weighted_adapter(
                [n for n, _ in pairs], [w for _, w in pairs], adapter_name=key, combination_type="cat"
            )
    for m in peft.modules():
        for key in mixes:
            if isinstance(getattr(m, "scaling", None), dict) and key in m.scaling:
                m.scaling[key] = 1.0  # "cat" folds weights and scales into B (see tests/peft_helpers.py)
    ref, start = torch.empty_like(ours), 0
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
        base = twin(x)
    err = rel(ours, ref, ref - base)
    slots = sorted(i for i in manager.lora_index_to_id if i is not None)
    ok = type(wrapper).__name__ == "PunicaWrapperDLP" and err < 1e-5 and len(slots) == 5
    return ok, f"wrapper {type(wrapper).__name__}, slots {slots}, relative error {err} against PEFT 'cat'"


def _tp2_worker(rank: int, port: int, out_dir: str) -> None:
    _env()
    import torch

    torch.set_num_threads(1)
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        _init_dist(2, rank, port)
        torch.save(_tp_outputs(), os.path.join(out_dir, f"rank{rank}.pt"))


def _tp_outputs() -> dict:
    """Outputs of the column / row layers with our wrapper (plain and mix mappings), this TP size."""
    import torch
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from dlplora_triton.integrations import vllm_mix

    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    slots = [1, 2, 3, MIX_ID]
    requests = [(MIX_ID, 3), (2, 2), (0, 1), (1, 2)]
    vllm_mix.register_mix(MIX_ID, MIX)
    results = {}
    try:
        for kind in ("column", "row"):
            layer, _, make_x = build_layer(kind, torch.float32, seed=3)
            x = make_x(8)
            if kind == "row":  # input is parallel: each rank takes its K shard
                x = x.chunk(tp, dim=1)[rank].contiguous()
            for label, reqs in (
                ("plain", [(0 if lid == MIX_ID else lid, n) for lid, n in requests]),
                ("mix", requests),
            ):
                results[f"{kind}-{label}"] = run_layer(
                    layer, _wrapper("ours"), mapping(reqs, False), x, slots=slots
                )
            results[f"{kind}-base"] = run_layer(
                layer, _wrapper("ours"), mapping([(0, 8)], False), x, slots=slots
            )
    finally:
        vllm_mix.unregister_mix(MIX_ID)
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
    return all(e < 1e-5 for e in errs.values()), f"TP=2 vs TP=1 relative errors {errs}"


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
        "route-logits-refused",
        "route-errors",
    ):
        return case_refusals(name)
    if parts[0] == "mix":
        return case_mix(parts[1], parts[2])
    if parts[0] == "route":
        return case_route(parts[1])
    return {
        "plugin": case_plugin,
        "resolver": case_resolver,
        "worker-hooks": case_worker_hooks,
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
