"""MiLoRA: routers and pooling, training (plain loop and Trainer), save/load, PEFT loading, serving by attach."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft_helpers import make_model, save_adapter

import dlplora_triton as dlp
from dlplora_triton.gates import ModuleGates
from dlplora_triton.milora import POOLINGS, LayerRouter, MiLoRA, balance_loss
from dlplora_triton.milora.files import CONFIG_NAME, PEFT_WEIGHTS, ROUTERS_NAME

B, T = 3, 9


def batch(seed: int = 0, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1
    prompt = mask.clone().bool()
    prompt[0, 6:] = False  # rows 0 and 2 end with answer tokens the routers must not read
    prompt[2, 5:] = False
    return ids, mask, prompt


def trained(arch="llama", pooling="attention", top_k=2, steps=3, seed=0, **kwargs) -> MiLoRA:
    """A MiLoRA on a tiny model after a few AdamW steps (B no longer zero, routers moved)."""
    torch.manual_seed(seed)
    mi = MiLoRA(make_model(arch, seed), r=4, lora_alpha=8, top_k=top_k, pooling=pooling, **kwargs)
    opt = torch.optim.AdamW([p for p in mi.parameters() if p.requires_grad], lr=2e-2)
    ids, mask, prompt = batch(seed)
    labels = None if arch == "bert" else ids
    for _ in range(steps):
        out = mi(ids, attention_mask=mask, labels=labels, prompt_mask=prompt)
        loss = out.last_hidden_state.square().mean() + mi.balance_loss if labels is None else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return mi


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------- routers


def test_pooling_reads_only_prompt_tokens():
    torch.manual_seed(0)
    h = torch.randn(2, 6, 16)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    u = F.layer_norm(h, (16,))
    expected = {
        "mean": torch.stack([u[0, 1:4].mean(0), u[1, :2].mean(0)]),
        "max": torch.stack([u[0, 1:4].amax(0), u[1, :2].amax(0)]),
        "last": torch.stack([u[0, 3], u[1, 1]]),
        "attention": torch.stack([u[0, 1:4].mean(0), u[1, :2].mean(0)]),  # query 0 at init: mean
    }
    for pooling in POOLINGS:
        router = LayerRouter(16, 5, 2, pooling)
        torch.testing.assert_close(router.pool(h, mask), expected[pooling], msg=pooling)
    router = LayerRouter(16, 5, 2, "attention")
    with torch.no_grad():
        router.query.copy_(torch.randn(16))
    w = torch.softmax((u[0, 1:4] @ router.query) / 4.0, dim=0)
    torch.testing.assert_close(router.pool(h, mask)[0], (w[:, None] * u[0, 1:4]).sum(0))
    h2 = h.clone()
    h2[0, 4:] = 100.0  # tokens outside the prompt change nothing
    h2[1, 2:] = -7.0
    for pooling in POOLINGS:
        router = LayerRouter(16, 5, 2, pooling)
        torch.testing.assert_close(router(h2, mask)[1], router(h, mask)[1])


@pytest.mark.parametrize("top_k", [1, 2, 4, 5])
def test_gates_are_the_top_k_probabilities(top_k):
    torch.manual_seed(1)
    router = LayerRouter(16, 5, top_k, "mean")
    probs, gates = router(torch.randn(4, 3, 16), torch.ones(4, 3, dtype=torch.bool))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert ((gates > 0).sum(-1) == top_k).all()
    kept = probs.topk(top_k, dim=-1)
    torch.testing.assert_close(gates.gather(-1, kept.indices), kept.values)
    assert float(balance_loss(probs, gates, top_k).detach()) > 0


def test_balance_loss_is_one_when_balanced_and_grows_when_not():
    probs = torch.full((4, 4), 0.25)
    gates = torch.eye(4) * 0.25  # each module picked once
    assert float(balance_loss(probs, gates, 1)) == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert float(balance_loss(skewed, torch.tensor([[0.7, 0, 0, 0]] * 4), 1)) == pytest.approx(2.8)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_forward_gates_every_pooling_and_top_k(pooling, top_k):
    mi = trained(pooling=pooling, top_k=top_k, steps=1)
    ids, mask, prompt = batch()
    with torch.no_grad():
        mi(ids, attention_mask=mask, prompt_mask=prompt)
    assert mi.gates.shape == (B, mi.num_layers, 7)
    assert ((mi.gates > 0).sum(-1) == top_k).all()
    first = mi.gates.clone()
    answer = ids.clone()
    answer[0, 6:] = 5  # different answer tokens: same prompt, same gates
    answer[2, 5:] = 6
    with torch.no_grad():
        mi(answer, attention_mask=mask, prompt_mask=prompt)
    torch.testing.assert_close(mi.gates, first)


def test_the_routers_ignore_answer_tokens_only_when_told():
    mi = trained(pooling="mean", steps=2)
    ids, mask, prompt = batch()
    answer = ids.clone()
    answer[0, 6:] = 5
    probs = {}
    for name, x in (("a", ids), ("b", answer)):
        state = []
        hook = mi.routers[1].register_forward_hook(lambda m, a, out: state.append(out[0]))
        with torch.no_grad():
            mi(x, attention_mask=mask)  # default prompt_mask = attention_mask: answers pooled too
        hook.remove()
        probs[name] = state[0]
    assert not torch.allclose(probs["a"][0], probs["b"][0])  # the answer moved row 0's routing
    torch.testing.assert_close(probs["a"][1:], probs["b"][1:])


def test_loss_includes_the_balance_term_and_gradients_reach_lora_and_routers():
    mi = trained(steps=2)
    ids, mask, prompt = batch()
    out = mi(ids, attention_mask=mask, labels=ids, prompt_mask=prompt)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    task = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + 1e-2 * mi.balance_loss.detach(), rtol=1e-5, atol=1e-6)
    assert float(mi.balance_loss.detach()) >= 1.0 - 1e-6
    out.loss.backward()
    picked = mi.gates > 0  # [B, layers, modules]
    for i in range(mi.num_layers):
        for j in range(mi.num_modules):
            g = mi.lora[i][j].lora_B.grad
            # a module no row picked has gate 0 for every row: no gradient reaches it
            assert (g is not None and bool(g.abs().sum() > 0)) == bool(picked[:, i, j].any()), (i, j)
    for name, p in mi.named_parameters():
        if name.startswith("routers."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not name.startswith("lora."):
            assert not p.requires_grad and p.grad is None, name


def test_balance_coef_zero_is_the_task_loss_and_remove_restores_the_model():
    model = make_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask, prompt = batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, labels=ids)
    mi = MiLoRA(model, r=4, lora_alpha=8, balance_coef=0.0)
    with torch.no_grad():
        out = mi(ids, attention_mask=mask, labels=ids)  # B = 0 at init: the base model's outputs
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    mi.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 8}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"pooling": "sum"}, "pooling"),
        ({"r": 0}, "r must"),
        ({"target_modules": ["q_proj", "nope"]}, "nope"),
        ({"target_modules": ["q_proj"], "top_k": 2}, "top_k"),
    ],
    ids=["top_k-0", "top_k-beyond", "top_k-float", "pooling", "r", "target", "top_k-vs-targets"],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MiLoRA(make_model("llama"), **kwargs)


def test_bad_prompt_masks_raise_value_error():
    mi = MiLoRA(make_model("llama"), r=2)
    ids, mask, prompt = batch()
    with pytest.raises(ValueError, match=r"prompt_mask must have the input's shape \[B, T\] = \[3, 9\]"):
        mi(ids, prompt_mask=prompt[:, :5])
    with pytest.raises(ValueError, match="prompt_mask"):
        mi(ids, prompt_mask=prompt[:2])
    empty = prompt.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no prompt token"):
        mi(ids, prompt_mask=empty)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "bert"])
def test_other_architectures(arch):
    mi = trained(arch=arch, steps=2)
    expected = {"qwen2": 7, "gpt2": 4, "bert": 6}[arch]
    assert mi.num_modules == expected
    ids, mask, prompt = batch()
    with torch.no_grad():
        mi(ids, attention_mask=mask, prompt_mask=prompt)
    assert mi.gates.shape == (B, 2, expected)


def test_trains_with_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    mi = MiLoRA(make_model("llama"), r=4, lora_alpha=8, top_k=2)
    ids, mask, prompt = batch()
    rows = [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i], "prompt_mask": prompt[i]}
        for i in range(B)
    ] * 4
    before = {n: p.detach().clone() for n, p in mi.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        remove_unused_columns=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(model=mi, args=args, train_dataset=rows).train()
    assert result.global_step == 4
    moved = [n for n, p in mi.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("routers.") for n in moved) and any("lora_B" in n for n in moved)
    assert mi.gates.shape == (3, 2, 7)


# ---------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    mi = trained(pooling="max", top_k=3, steps=3)
    mi.save(tmp_path)
    ids, mask, prompt = batch(1)
    again = MiLoRA.load(make_model("llama"), tmp_path)
    assert (again.top_k, again.pooling, again.r, again.lora_alpha) == (3, "max", 4, 8.0)
    with torch.no_grad():
        a = mi(ids, attention_mask=mask, prompt_mask=prompt).logits
        b = again(ids, attention_mask=mask, prompt_mask=prompt).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(again.gates, mi.gates, rtol=0, atol=0)


def test_saved_lora_loads_in_peft_gates_off(tmp_path):
    from peft import PeftModel

    mi = trained(steps=3)
    mi.save(tmp_path)
    ids, mask, _ = batch()
    base = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    # PEFT computes base + scale * B A x on every module: MiLoRA with every gate forced to 1.
    ones = MiLoRA.load(base, tmp_path)
    for router in ones.routers:
        router.forward = lambda h, m: (torch.ones(h.shape[0], 7), torch.ones(h.shape[0], 7))
    with torch.no_grad():
        ref = ones(ids, attention_mask=mask).logits
        got = peft(ids, attention_mask=mask).logits
    assert rel(got, ref) < 1e-5
    assert rel(got, make_model("llama")(ids, attention_mask=mask).logits) > 1e-3  # the LoRA does something


def _broken(tmp_path, edit):
    mi = trained(steps=1)
    mi.save(tmp_path)
    edit(tmp_path)
    return tmp_path


def _set_config(key, value):
    def edit(path):
        config = json.loads((path / CONFIG_NAME).read_text())
        config[key] = value
        (path / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _router_tensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / ROUTERS_NAME))
    change(tensors)
    save_file(tensors, str(path / ROUTERS_NAME))


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda p: (p / ROUTERS_NAME).unlink(), FileNotFoundError, ROUTERS_NAME),
        (lambda p: (p / PEFT_WEIGHTS).unlink(), FileNotFoundError, PEFT_WEIGHTS),
        (lambda p: (p / CONFIG_NAME).write_text("{not json"), ValueError, CONFIG_NAME),
        (lambda p: (p / ROUTERS_NAME).write_bytes(b"\x00" * 64), ValueError, ROUTERS_NAME),
        (_set_config("top_k", 9), ValueError, "top_k"),
        (_set_config("pooling", "sum"), ValueError, "pooling"),
        (_set_config("num_layers", 5), ValueError, "5 decoder layers"),
        (_set_config("modules", ["self_attn.q_proj", "mlp.nope"]), ValueError, CONFIG_NAME),
        (_set_config("r", 3), ValueError, "r / lora_alpha"),
        (lambda p: _router_tensors(p, lambda t: t.pop("layers.1.proj.weight")), ValueError, "layers.1.proj"),
        (
            lambda p: _router_tensors(p, lambda t: t.update({"layers.0.act.beta": torch.ones(5)})),
            ValueError,
            "shape",
        ),
    ],
    ids=[
        "no-routers",
        "no-lora",
        "bad-json",
        "garbage-routers",
        "top_k",
        "pooling",
        "layers",
        "modules",
        "rank",
        "missing-tensor",
        "tensor-shape",
    ],
)
def test_broken_directories_raise_naming_the_file(tmp_path, edit, error, match):
    path = _broken(tmp_path, edit)
    with pytest.raises(error, match=match):
        MiLoRA.load(make_model("llama"), path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        MiLoRA.load(make_model("llama"), "no-such-dir")


# ---------------------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """pooling -> (trained MiLoRA, its directory)."""
    out = {}
    for pooling in POOLINGS:
        mi = trained(pooling=pooling, steps=4, seed=POOLINGS.index(pooling))
        path = tmp_path_factory.mktemp(f"mi-{pooling}")
        mi.save(path)
        out[pooling] = (mi, path)
    return out


def served(path, **adapters):
    model = make_model("llama", seed=POOLINGS.index(json.loads((path / CONFIG_NAME).read_text())["pooling"]))
    return model, dlp.attach(model, {"mi": path, **adapters})


@pytest.mark.parametrize("pooling", POOLINGS)
def test_served_prefill_equals_the_training_forward(saved, pooling):
    mi, path = saved[pooling]
    model, lora = served(path)
    ids, mask, _ = batch(2)
    lora.select([[("mi", 1.0)]] * B)
    with torch.no_grad():
        ref = mi(ids, attention_mask=mask).logits  # prompt_mask defaults to attention_mask, as served
        got = model(ids, attention_mask=mask).logits
    assert rel(got, ref) < 1e-5
    assert lora.gates("mi").shape == (B, 2, 7)
    torch.testing.assert_close(lora.gates("mi"), mi.gates, rtol=0, atol=1e-6)
    assert isinstance(lora.layers["model.layers.0.self_attn.q_proj"], dlp.MultiLoRALinear)  # fused path


def test_each_layer_sets_only_its_own_modules_and_a_new_request_replaces_them(saved, monkeypatch):
    mi, path = saved["attention"]
    model, lora = served(path)
    calls = []
    set_gates = ModuleGates.set
    monkeypatch.setattr(
        ModuleGates,
        "set",
        lambda self, name, gates: calls.append(sorted(gates)) or set_gates(self, name, gates),
    )
    lora.select([[("mi", 1.0)]] * B)
    for seed in (5, 6):  # the second request (same selection) overwrites every layer's gates
        ids, mask, _ = batch(seed)
        calls.clear()
        with torch.no_grad():
            ref = mi(ids, attention_mask=mask).logits
            got = model(ids, attention_mask=mask).logits
        assert calls == [sorted(mi.module_paths(i)) for i in range(mi.num_layers)]
        assert rel(got, ref) < 1e-5, seed
        torch.testing.assert_close(lora.gates("mi"), mi.gates, rtol=0, atol=1e-6)


def test_routers_run_once_per_request_and_decode_reuses_the_prompt_gates(saved, monkeypatch):
    mi, path = saved["attention"]
    model, lora = served(path)
    calls = []
    forward = LayerRouter.forward
    monkeypatch.setattr(
        LayerRouter, "forward", lambda self, h, m: calls.append(h.shape) or forward(self, h, m)
    )
    ids = batch(3)[0]
    new = 6
    with lora.selection([[("mi", 1.0)]] * B), torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert len(calls) == mi.num_layers  # one router call per layer for the whole request
    assert all(shape[1] == T for shape in calls)  # at prefill, on the prompt
    # Every decode step used the prompt's gates: the training forward over prompt + generated tokens,
    # pooling only the prompt, gives the same logits at every generated position.
    full = out.sequences
    prompt = torch.zeros_like(full, dtype=torch.bool)
    prompt[:, :T] = True
    calls.clear()
    with torch.no_grad():
        ref = mi(full, prompt_mask=prompt).logits[:, T - 1 : -1]
    got = torch.stack(out.logits, dim=1)
    assert rel(got, ref) < 1e-5


def test_a_batch_equals_each_prompt_alone(saved):
    _, path = saved["mean"]
    model, lora = served(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 9, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, 9 - len(p) :], mask[i, 9 - len(p) :] = p, 1
    with lora.selection([[("mi", 1.0)]] * 3), torch.no_grad():
        together = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False
        )
        gates = lora.gates("mi").clone()
    for i, p in enumerate(prompts):
        with lora.selection([[("mi", 1.0)]]), torch.no_grad():
            alone = model.generate(p[None], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert together[i, 9:].tolist() == alone[0, len(p) :].tolist(), i
        torch.testing.assert_close(gates[i], lora.gates("mi")[0], rtol=0, atol=1e-5)


def _peft_factors(path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, t in tensors.items():
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        out.setdefault(module, {})[part.split(".")[0]] = t
    return out


def test_a_row_mixes_milora_with_an_ordinary_adapter(saved, tmp_path):
    mi, path = saved["last"]
    de = save_adapter(
        make_model("llama"),
        tmp_path / "de",
        seed=5,
        scale=0.3,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
    )
    model, lora = served(path, de=de)
    rows = [[("de", 0.6), ("mi", 0.4)], [("mi", 1.0)], [("de", 1.0)], []]
    ids = batch(5)[0][:1].repeat(4, 1)
    with lora.selection(rows), torch.no_grad():
        got = model(ids).logits
        gates = lora.gates("mi").clone()
    assert (gates[2:] == 0).all() and (gates[:2] > 0).sum(-1).eq(2).all()  # rows without "mi": no gates

    factors = _peft_factors(tmp_path / "de")
    for i, row in enumerate(rows):
        weights = dict(row)
        ref_model = make_model("llama", seed=POOLINGS.index("last"))
        ref = MiLoRA.load(ref_model, path)
        with torch.no_grad():
            for layer in ref.lora:
                for f in layer:
                    f.lora_B.mul_(weights.get("mi", 0.0))
        hooks = [
            ref_model.get_submodule(m).register_forward_hook(
                lambda mod, a, y, f=f: y + weights.get("de", 0.0) * 2.0 * (a[0] @ f["A"].t()) @ f["B"].t()
            )
            for m, f in factors.items()
        ]
        with torch.no_grad():
            expected = ref(ids[i : i + 1]).logits
        for h in hooks:
            h.remove()
        assert rel(got[i : i + 1], expected) < 1e-5, row
        if "mi" in weights:
            torch.testing.assert_close(gates[i], ref.gates[0], rtol=0, atol=1e-6)


def test_token_level_mode_reruns_the_routers_every_step(saved):
    mi, path = saved["max"]
    model, lora = served(path)
    server = lora._milora["mi"]
    server.every_step = True
    with lora.selection([[("mi", 1.0)]] * B), torch.no_grad():
        model.generate(batch()[0], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert server.router_calls == mi.num_layers * 4  # prefill + 3 decode steps


def test_attach_checks_the_directory_and_detach_removes_every_hook(saved, tmp_path):
    import shutil

    _, path = saved["attention"]
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    config = json.loads((broken / CONFIG_NAME).read_text())
    config["modules"] = config["modules"][:6]  # the LoRA files adapt 7 modules per layer
    (broken / CONFIG_NAME).write_text(json.dumps(config))
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"milora_routers.safetensors.*expected \[6, 32\]"):
        dlp.attach(model, {"mi": broken})
    assert not any(isinstance(m, dlp.MultiLoRALinear) for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())

    lora = dlp.attach(model, {"mi": path})
    assert lora.gates("mi") is None
    with pytest.raises(KeyError, match="not an attached MiLoRA adapter"):
        lora.gates("nope")
    lora.detach()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    lora = dlp.attach(model, {})
    lora.add("mi", path)
    lora.select([[("mi", 1.0)]])
    with torch.no_grad():
        model(batch()[0][:1])
    assert lora.gates("mi").shape == (1, 2, 7)
    lora.select(None)
    lora.remove("mi")
    with pytest.raises(KeyError):
        lora.gates("mi")
    lora.detach()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_cli_prints_the_modules_chosen_per_layer(saved, tmp_path, capsys):
    from transformers import BertTokenizerFast

    from dlplora_triton.cli import main

    _, path = saved["mean"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "fox", "hello", "world"])
    )
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    model = make_model("llama", seed=POOLINGS.index("mean"))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = [
        "milora-gates",
        "--model",
        str(tmp_path / "model"),
        "--milora",
        str(path),
        "the fox",
        "hello world",
    ]
    assert main(argv + ["--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "'the fox':" in text and text.count("layer  1:") == 2
    assert main(argv + ["--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["modules"]) == 7 and len(doc["prompts"]) == 2
    assert all(sum(g > 0 for g in layer) == 2 for p in doc["prompts"] for layer in p["gates"])
    assert main(["milora-gates", "--model", str(tmp_path / "nope"), "--milora", str(path), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_packed_sequences_are_routed_each_alone(saved):
    _, path = saved["attention"]
    model, lora = served(path)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in (4, 7)]
    with (
        lora.selection([[("mi", 1.0)], [("mi", 1.0)]], seq_offsets=torch.tensor([0, 4, 11])),
        torch.no_grad(),
    ):
        model(torch.cat(seqs)[None])
        packed = lora.gates("mi").clone()
    for i, s in enumerate(seqs):
        with lora.selection([[("mi", 1.0)]]), torch.no_grad():
            model(s[None])
        # layer 0 reads the embeddings, which packing does not change (later layers see the packed attention)
        torch.testing.assert_close(packed[i, 0], lora.gates("mi")[0, 0], rtol=0, atol=1e-6)
