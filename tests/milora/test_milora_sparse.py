"""MiLoRA served sparsely: a (row, module) whose gate is 0 does no LoRA work, on both backends, exactly.

The gates of a request are set once at prefill (``MultiLoRA.set_module_gates``); a slot whose gate is 0
is dropped from that module's plan (``DroppedSlots``, ``LoRABatch.dropping``), so the PyTorch path and
the Triton kernels never shrink or expand it, and a module that no row picked runs its base layer only. Checked here:
served logits equal the training forward and the dense gated computation (every module computed, the
unpicked ones multiplied by 0) for top_k 1..M and every pooling, through prefill and decode, with left
padding and rows mixing "mi" with another adapter and the base model; the LoRA work (matmul
multiply-adds) equals what the picked (row, module) pairs need, no more. These batches are small, and
the PyTorch path serves small batches (``batch.SPARSE_MIN_TOKENS``, decode steps) with the dropped slots
at weight 0 instead: the tests set the threshold to 0 to check the sparse plans, and
``test_small_cpu_batches_keep_dropped_slots_at_weight_0`` checks the small-batch form.
"""

import copy

import pytest
import torch
from peft_helpers import make_model, save_adapter
from torch.utils._python_dispatch import TorchDispatchMode

import dlplora_triton as dlp
from dlplora_triton import batch as batch_module
from dlplora_triton.gates import ModuleGates
from dlplora_triton.layers import PlanSource, ShrinkGroup
from dlplora_triton.milora import POOLINGS, LayerRouter, MiLoRA
from dlplora_triton.patch import MultiLoRA
from dlplora_triton.reference import fused_lora_reference

B, T = 3, 9
M = 7  # modules per Llama layer
SMALL_BATCH = batch_module.SPARSE_MIN_TOKENS  # the default, read before the fixture below changes it


@pytest.fixture(autouse=True)
def sparse_plans_at_any_size(monkeypatch):
    """Every batch here gets plans without its dropped slots (the form large batches get)."""
    monkeypatch.setattr(batch_module, "SPARSE_MIN_TOKENS", 0)


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def train(pooling: str, top_k: int, seed: int = 0) -> MiLoRA:
    torch.manual_seed(seed)
    mi = MiLoRA(make_model("llama", seed), r=4, lora_alpha=8, top_k=top_k, pooling=pooling)
    opt = torch.optim.AdamW([p for p in mi.parameters() if p.requires_grad], lr=2e-2)
    ids, mask = padded_batch(seed)
    for _ in range(3):
        mi(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # routers that separate the rows: different rows pick different modules
        for router in mi.routers:
            router.proj.weight.normal_(0, 1.0)
    return mi


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def serve(mi: MiLoRA, tmp_path, seed: int = 0, **adapters) -> tuple[torch.nn.Module, MultiLoRA]:
    mi.save(tmp_path)
    model = make_model("llama", seed)
    return model, dlp.attach(model, {"mi": tmp_path, **adapters})


def no_dropped_slots(monkeypatch):
    """Serve densely: every module computed for every row, gate 0 included (what was served before)."""
    monkeypatch.setattr(ModuleGates, "_set_dropped", lambda self, sel, paths, dropped: None)


class MatmulCount(TorchDispatchMode):
    """Multiply-adds of every matmul (mm, addmm, bmm, baddbmm) run while ``on``."""

    MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.macs, self.on = 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.on and name in self.MATMULS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.macs += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def counted(fn, monkeypatch):
    """(result, multiply-adds) of ``fn()``, the routers' own matmuls not counted."""
    mode = MatmulCount()
    forward = LayerRouter.forward

    def router(self, h, m):
        mode.on = False
        try:
            return forward(self, h, m)
        finally:
            mode.on = True

    monkeypatch.setattr(LayerRouter, "forward", router)
    with mode:
        result = fn()
    monkeypatch.setattr(LayerRouter, "forward", forward)
    return result, mode.macs


def expected_lora_macs(lora: MultiLoRA, tokens_per_row: list[int], weights: list[float]) -> int:
    """What the picked (row, module) pairs of "mi" need: tokens x r x (K + N), nothing for the rest."""
    served = lora._milora["mi"]
    gates = lora.gates("mi")
    total = 0
    for i, paths in enumerate(served.paths):
        for m, path in enumerate(paths):
            layer = lora.layers[path]
            r = served.config.r
            for b, n in enumerate(tokens_per_row):
                if float(gates[b, i, m]) * weights[b] != 0:
                    total += n * r * (layer.in_features + layer.out_features)
    return total


def prefill(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=True)


def decode(model, out, mask):
    """One greedy decode step after ``out`` (a forward with its KV cache)."""
    nxt = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        return model(
            nxt,
            attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
            cache=out.past_key_values,
        )


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("top_k", range(1, M + 1))
def test_sparse_serving_equals_training_and_dense_gated(pooling, top_k, tmp_path, monkeypatch):
    mi = train(pooling, top_k, seed=top_k)
    model, lora = serve(mi, tmp_path, seed=top_k)
    ids, mask = padded_batch(10 + top_k)
    new = 3
    gen = dict(
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with lora.selection([[("mi", 1.0)]] * B), torch.no_grad():
        prefill = model(ids, attention_mask=mask).logits
        dropped = [layer.dropped_slots for layer in lora.layers.values()]
        out = model.generate(ids, **gen)
    # Dropped slots exist exactly when some gate is 0 (top_k < M)
    assert all(d is not None for d in dropped)
    assert any(d.key for d in dropped) == (top_k < M)
    with torch.no_grad():
        ref = mi(ids, attention_mask=mask).logits
    assert rel(prefill, ref) < 1e-5
    # Every decode step used the prompt's gates: the training forward over prompt + generated tokens.
    full = out.sequences
    prompt = torch.cat([mask, torch.zeros(B, new, dtype=torch.long)], 1).bool()
    with torch.no_grad():
        ref = mi(
            full,
            attention_mask=torch.cat([mask, torch.ones(B, new, dtype=torch.long)], 1),
            prompt_mask=prompt,
        )
    got = torch.stack(out.logits, dim=1)
    assert rel(got, ref.logits[:, T - 1 : -1]) < 1e-5
    # The dense gated computation (nothing skipped) gives the same logits.
    no_dropped_slots(monkeypatch)
    with lora.selection([[("mi", 1.0)]] * B), torch.no_grad():
        dense = model.generate(ids, **gen)
        assert all(layer.dropped_slots is None for layer in lora.layers.values())
    assert rel(got, torch.stack(dense.logits, dim=1)) < 1e-5
    assert torch.equal(dense.sequences, out.sequences)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_no_lora_work_for_a_gate_of_zero(top_k, tmp_path, monkeypatch):
    """The LoRA matmuls of prefill and of a decode step are exactly those of the picked (row, module)
    pairs; the dense gated computation does every module for every row."""
    mi = train("attention", top_k, seed=3)
    model, lora = serve(mi, tmp_path, seed=3)
    ids, mask = padded_batch(4)
    with lora.selection([[]] * B):
        out, base_prefill = counted(lambda: prefill(model, ids, mask), monkeypatch)
        _, base_decode = counted(lambda: decode(model, out, mask), monkeypatch)
    rows = [[("mi", 1.0)], [("mi", 0.5)], []]  # the base row costs nothing either
    weights = [1.0, 0.5, 0.0]
    with lora.selection(rows):
        out, prefill_macs = counted(lambda: prefill(model, ids, mask), monkeypatch)
        _, decode_macs = counted(lambda: decode(model, out, mask), monkeypatch)
        assert prefill_macs - base_prefill == expected_lora_macs(lora, [T] * B, weights)
        assert decode_macs - base_decode == expected_lora_macs(lora, [1] * B, weights)
    # Every module computed for both "mi" rows (the dense gated computation): the work not done.
    dense = sum(2 * mi.r * (layer.in_features + layer.out_features) for layer in lora.layers.values())
    assert decode_macs - base_decode < dense


def test_a_module_no_row_picked_runs_its_base_layer_only(tmp_path, monkeypatch):
    mi = train("mean", 1, seed=5)
    model, lora = serve(mi, tmp_path, seed=5)
    ids, mask = padded_batch(5)
    lora.select([[("mi", 1.0)]] * B)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    gates = lora.gates("mi")
    idle = [
        path
        for i, paths in enumerate(lora._milora["mi"].paths)
        for m, path in enumerate(paths)
        if not bool((gates[:, i, m] != 0).any())
    ]
    assert idle, "with top-1 of 7 and 3 rows some module is picked by no row"
    calls = []
    for path in idle:
        layer = lora.layers[path]
        layer.plan_source = type(
            "Spy", (PlanSource,), {"adapter_mask": -1, "active": True, "batch": lambda *a: calls.append(a)}
        )()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # a prefill: the gates are set again, the spies never asked
    assert calls == []


# ---------------------------------------------------------------------------------------------- mixes


def test_rows_mixing_milora_with_an_adapter_and_the_base(tmp_path, monkeypatch):
    mi = train("last", 2, seed=6)
    de = save_adapter(
        make_model("llama"),
        tmp_path / "de",
        seed=5,
        scale=0.3,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
    )
    model, lora = serve(mi, tmp_path / "mi", seed=6, de=de)
    rows = [[("de", 0.6), ("mi", 0.4)], [("mi", 1.0)], []]
    ids, mask = padded_batch(7)
    gen = dict(
        attention_mask=mask,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with lora.selection(rows), torch.no_grad():
        out = model.generate(ids, **gen)
        gates = lora.gates("mi").clone()
    assert (gates[2] == 0).all() and ((gates[:2] > 0).sum(-1) == 2).all()
    with monkeypatch.context() as m:
        no_dropped_slots(m)
        with lora.selection(rows), torch.no_grad():
            dense = model.generate(ids, **gen)
    assert rel(torch.stack(out.logits, 1), torch.stack(dense.logits, 1)) < 1e-5
    assert torch.equal(out.sequences, dense.sequences)
    # The reference from MiLoRA's own hooks plus the de LoRA, row by row (prefill).
    from safetensors.torch import load_file

    factors = {}
    for key, t in load_file(str(tmp_path / "de" / "adapter_model.safetensors")).items():
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        factors.setdefault(module, {})[part.split(".")[0]] = t
    with lora.selection(rows), torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    for b, row in enumerate(rows):
        weights = dict(row)
        ref_model = make_model("llama", 6)
        ref = MiLoRA.load(ref_model, tmp_path / "mi")
        with torch.no_grad():
            for layer in ref.lora:
                for f in layer:
                    f.lora_B.mul_(weights.get("mi", 0.0))
        hooks = [
            ref_model.get_submodule(p).register_forward_hook(
                lambda mod, a, y, f=f: y + weights.get("de", 0.0) * 2.0 * (a[0] @ f["A"].t()) @ f["B"].t()
            )
            for p, f in factors.items()
        ]
        with torch.no_grad():
            want = ref(ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        for h in hooks:
            h.remove()
        keep = mask[b].bool()
        assert rel(got[b, keep], want[0, keep]) < 1e-5, row


def record_shares(monkeypatch) -> list:
    """The layers that take a shared shrink, in call order (ShrinkGroup.share spied on)."""
    shared, share = [], ShrinkGroup.share

    def sharing(self, layer, x, batch):
        part = share(self, layer, x, batch)
        if part is not None:
            shared.append(layer)
        return part

    monkeypatch.setattr(ShrinkGroup, "share", sharing)
    return shared


def test_shared_shrink_with_members_picked_by_different_rows(tmp_path, monkeypatch):
    """q/k/v and gate/up share one shrink only when they keep the same rows; otherwise each runs alone,
    and either way the result is the dense gated one."""
    mi = train("max", 2, seed=8)
    model, lora = serve(mi, tmp_path, seed=8)
    ids, mask = padded_batch(8)
    shared = record_shares(monkeypatch)
    lora.select([[("mi", 1.0)]] * B)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    groups = {
        id(layer.shrink_group): layer.shrink_group for layer in lora.layers.values() if layer.shrink_group
    }
    keys = [
        [None if m.dropped_slots is None else m.dropped_slots.key for m in g.members] for g in groups.values()
    ]
    assert any(len(set(k)) > 1 for k in keys), "some group's members keep different rows"
    for g, k in zip(groups.values(), keys):
        if len(set(k)) > 1:
            assert not any(m in shared for m in g.members)
    # Same rows for every member of a group (gates set by hand, the routers' hooks off): the shared
    # shrink on the sparse plan.
    lora._milora["mi"].remove()
    lora.select([[("mi", 1.0)]] * B)
    q, k, v = (f"model.layers.0.self_attn.{n}_proj" for n in "qkv")
    gate = torch.tensor([0.7, 0.0, 1.3])
    lora.set_module_gates("mi", {q: gate, k: gate, v: gate})
    assert lora.layers[q].dropped_slots.key == lora.layers[v].dropped_slots.key == (1,)
    shared.clear()
    with torch.no_grad():
        sparse = model(ids, attention_mask=mask).logits
    assert lora.layers[q] in shared and lora.layers[v] in shared
    no_dropped_slots(monkeypatch)
    lora.select([[("mi", 1.0)]] * B)
    lora.set_module_gates("mi", {q: gate, k: gate, v: gate})
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
    assert rel(sparse, dense) < 1e-5
    assert got.shape == sparse.shape


def test_small_cpu_batches_keep_dropped_slots_at_weight_0(tmp_path, monkeypatch):
    """Below ``SPARSE_MIN_TOKENS`` tokens (decode steps) a layer keeps its dropped slots at weight 0 on
    the selection's batch: members of a group share one shrink even when they keep different rows, and
    prefill and decode logits equal those of the sparse plans."""
    assert B * T < SMALL_BATCH
    mi = train("max", 2, seed=8)
    model, lora = serve(mi, tmp_path, seed=8)
    ids, mask = padded_batch(8)
    lora.select([[("mi", 1.0)]] * B)
    out = prefill(model, ids, mask)
    sparse = (out.logits, decode(model, out, mask).logits)
    monkeypatch.setattr(batch_module, "SPARSE_MIN_TOKENS", SMALL_BATCH)
    shared = record_shares(monkeypatch)
    lora.select([[("mi", 1.0)]] * B)
    out = prefill(model, ids, mask)
    small = (out.logits, decode(model, out, mask).logits)
    for got, want in zip(small, sparse):
        assert rel(got, want) < 1e-5
    groups = {
        id(layer.shrink_group): layer.shrink_group for layer in lora.layers.values() if layer.shrink_group
    }
    mixed = [g for g in groups.values() if len({m.dropped_slots.key for m in g.members}) > 1]
    assert mixed, "some group's members keep different rows"
    used = [m for g in mixed for m in g.members if m.dropped_slots.adapter_mask & m._adapter_mask]
    assert used and all(m in shared for m in used), "every member with work shares its group's shrink"


def test_gates_that_require_grad_drop_nothing(tmp_path):
    mi = train("mean", 2, seed=9)
    model, lora = serve(mi, tmp_path, seed=9)
    lora.select([[("mi", 1.0)]] * B)
    path = "model.layers.1.mlp.down_proj"
    gate = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    lora.set_module_gates("mi", {path: gate})
    assert lora.layers[path].dropped_slots is None  # the gradient of a gate at 0 is not 0
    ids, mask = padded_batch(9)
    for p in model.parameters():
        p.requires_grad_(False)
    # reading the gates does not run the routers (no prefill hook on a direct layer call)
    x = torch.randn(B, T, lora.layers[path].in_features)
    lora.layers[path](x).square().sum().backward()
    assert gate.grad[1] != 0


# ---------------------------------------------------------------------------------------------- Triton


@pytest.mark.interpreter
@pytest.mark.parametrize("pooling, top_k", [("attention", 2), ("last", 1)])
def test_triton_kernels_on_the_module_plans(pooling, top_k, tmp_path, monkeypatch):
    """Served with the Triton kernels (interpreter): the same logits as the training forward, each
    layer's delta equal to the float64 reference of the dense gated computation, and the shrink
    launches cover exactly the (token, slot) rows of the picked (row, module) pairs."""
    import dlplora_triton.kernels as kernels

    mi = train(pooling, top_k, seed=11)
    model, lora = serve(mi, tmp_path, seed=11)
    ids, mask = padded_batch(11)
    for layer in lora.layers.values():
        layer.backend = "triton"
    launches = []
    launch = kernels.lora_shrink_launch
    monkeypatch.setattr(
        kernels,
        "lora_shrink_launch",
        lambda *a: launches.append(int((a[6] - a[5]).sum())) or launch(*a),
    )
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, a, p=p: inputs.__setitem__(p, a[0]))
        for p, layer in lora.layers.items()
    ]
    rows = [[("mi", 1.0)], [("mi", 0.5)], []]
    with lora.selection(rows):
        out = prefill(model, ids, mask)
        step = decode(model, out, mask)
        weights = [1.0, 0.5, 0.0]
        assert sum(launches) == expected_rows(lora, T, weights) + expected_rows(lora, 1, weights)
        for h in hooks:
            h.remove()
        # Layer by layer, on the decode step's inputs: the kernels on the layer's own plan against the
        # float64 reference of every module computed with its gate.
        sel = lora._source.selection
        for path, layer in lora.layers.items():
            x = inputs[path].reshape(-1, layer.in_features)
            got = torch.zeros(x.shape[0], layer.out_features)
            if layer.dropped_slots is not None and not (
                layer.dropped_slots.adapter_mask & layer._adapter_mask
            ):
                continue  # picked by no row: never launched
            plan = lora._source.batch(inputs[path]).dropping(layer.dropped_slots).plan
            dlp.fused_lora_planned(
                x,
                layer.lora_a,
                layer.lora_b,
                plan,
                layer.ranks,
                layer.scales,
                out=got,
                backend="triton",
                adapter_weights=layer.row_weights,
            )
            ref = fused_lora_reference(
                x.double(),
                layer.lora_a.double(),
                layer.lora_b.double(),
                torch.arange(B + 1) * (x.shape[0] // B),
                sel.adapter_ids,
                layer.row_weights.double(),
                layer.ranks,
                layer.scales.double(),
            )
            if ref.norm() > 0:
                assert rel(got, ref) < 1e-5, path
            else:
                assert not got.any(), path
    for layer in lora.layers.values():
        layer.backend = "auto"
    with lora.selection(rows):
        torch_out = prefill(model, ids, mask)
        torch_step = decode(model, torch_out, mask)
    assert rel(out.logits, torch_out.logits) < 1e-5
    assert rel(step.logits, torch_step.logits) < 1e-5


def expected_rows(lora: MultiLoRA, tokens_per_row: int, weights: list[float]) -> int:
    served = lora._milora["mi"]
    gates = lora.gates("mi")
    return sum(
        tokens_per_row
        for i, paths in enumerate(served.paths)
        for m, _ in enumerate(paths)
        for b in range(B)
        if float(gates[b, i, m]) * weights[b] != 0
    )


# ---------------------------------------------------------------------------------------------- attach


def test_attach_refuses_a_model_milora_still_wraps(tmp_path):
    mi = train("attention", 2, seed=12)
    mi.save(tmp_path)
    model = mi.model
    with pytest.raises(ValueError, match=r"still wrapped by a dlp.MiLoRA .*mi.remove\(\)"):
        dlp.attach(model, {"mi": tmp_path})
    with pytest.raises(ValueError, match="still wrapped by a dlp.MiLoRA"):
        dlp.attach(mi, {"mi": tmp_path})  # the wrapper itself
    assert not any(isinstance(m, dlp.MultiLoRALinear) for m in model.modules())
    ids, mask = padded_batch(12)
    with torch.no_grad():
        want = mi(ids, attention_mask=mask).logits
    mi.remove()
    lora = dlp.attach(model, {"mi": tmp_path})  # unwrapped: the LoRA is applied once
    lora.select([[("mi", 1.0)]] * B)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert rel(got, want) < 1e-5


def test_attach_refuses_a_peft_model(tmp_path):
    from peft import PeftModel

    base = make_model("llama")
    path = save_adapter(base, tmp_path / "a", seed=1, scale=0.2, r=4, lora_alpha=8, target_modules=["q_proj"])
    peft = PeftModel.from_pretrained(copy.deepcopy(base), path)
    for model in (peft, peft.base_model.model):
        with pytest.raises(ValueError, match=r"PEFT LoRA layers .*q_proj.*unload\(\)"):
            dlp.attach(model, {"a": path})
    lora = dlp.attach(peft.unload(), {"a": path})
    assert len(lora.layers) == 2


def test_module_plans_launch_the_kernel_variants_of_the_selection_plan(tmp_path):
    """A module's plan has the static sizes of the selection's plan (T, P, L, tile counts, block
    sizes), so the kernels get the same block-shape choices: compile-check's sweep covers them and a
    route adds no kernel variant."""
    from dlplora_triton.kernels import expand_config, shrink_config

    mi = train("mean", 1, seed=14)
    model, lora = serve(mi, tmp_path, seed=14)
    ids, mask = padded_batch(14)
    lora.select([[("mi", 1.0)], [], [("mi", 0.5)]])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    dropping = [
        layer for layer in lora.layers.values() if layer.dropped_slots is not None and layer.dropped_slots.key
    ]
    assert dropping
    for shape in ((B, T, 32), (B, 1, 32)):  # prefill and decode
        x = torch.zeros(shape)
        plan = lora._source.batch(x).plan
        for layer in dropping:
            mine = lora._source.batch(x).dropping(layer.dropped_slots).plan
            assert mine is not plan
            static = lambda p: (  # noqa: E731
                p.num_tokens,
                p.num_slots,
                p.num_adapters,
                p.shrink_block_m,
                p.expand_block_m,
                p.shrink_tile_start.shape[0],
                p.expand_tile_count.shape[0],
                p.expand_tile_adapters.shape[1],
            )
            assert static(mine) == static(plan)
            R = layer.lora_a.shape[1]
            assert shrink_config(mine.shrink_tile_start.shape[0], 32, R, torch.float16) == shrink_config(
                plan.shrink_tile_start.shape[0], 32, R, torch.float16
            )
            assert expand_config(mine.expand_tile_count.shape[0], 64, R, torch.float16) == expand_config(
                plan.expand_tile_count.shape[0], 64, R, torch.float16
            )
            dropped = set(layer.dropped_slots.key)
            kept = plan.token_adapter.reshape(-1).clone()
            seq = (
                plan.token_seq.long().repeat_interleave(plan.num_slots) * plan.num_slots
                + torch.arange(plan.num_tokens * plan.num_slots) % plan.num_slots
            )
            kept[torch.tensor([int(s) in dropped for s in seq])] = -1
            assert torch.equal(mine.token_adapter.reshape(-1), kept)
