"""Dynamic LoRA (dlplora_triton.finetune): budget, grow/shrink exactness, optimizer state, PEFT export,
resumable fine-tuning, Trainer callback, bad arguments. Tiny random BERT models built from a config."""

import importlib.util
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import dlplora_triton
from dlplora_triton.commands.finetune import finetune_main
from dlplora_triton.finetune import (
    GATE_FILE,
    DynamicLoRA,
    DynamicLoRALinear,
    RankSchedule,
    match_target_modules,
)
from dlplora_triton.readers import read_labelled_jsonl

TARGETS = ["query", "value", "attention.output.dense"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spinning threads
    made this file 5x slower (28 s instead of 0.2 s for one test); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_bert(seed=0, labels=3):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval(), cfg


def randomize_b(dyn, seed=1):
    """B starts at zero (as in PEFT); tests of the delta need a non-zero one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dyn.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def batch(seed=0, rows=4, length=9, vocab=60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def train(model, dyn, steps, lr=5e-3, seed=0, check=None):
    opt = torch.optim.AdamW(dyn.trainable_parameters(), lr=lr)
    dyn.bind_optimizer(opt)
    labels = torch.tensor([0, 1, 2, 1])
    for t in range(steps):
        loss = model(**batch(seed + t), labels=labels).loss  # `loss` stays alive into the next forward
        loss.backward()
        opt.step()
        moved = dyn.step()
        opt.zero_grad()
        if check is not None:
            check(dyn, opt, moved)
    return opt


# ------------------------------------------------------------------ budget and schedule
def test_budget_is_conserved_at_every_reallocation():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(
        model,
        TARGETS,
        budget=20,
        total_steps=40,
        interval=2,
        warmup_steps=2,
        final_steps=6,
        modules_to_save=["classifier"],
        moves=2,
    )
    assert sorted(dyn.ranks.values()) == [3, 3, 3, 3, 4, 4]  # 20 over 6 modules, remainder to the first
    events = []

    def check(dyn, opt, moved):
        assert sum(dyn.ranks.values()) == 20
        assert all(1 <= r <= dyn.max_rank for r in dyn.ranks.values())
        events.append(moved)

    train(model, dyn, 40, check=check)
    assert sum(events) >= 5, "ranks should have moved"
    assert all(sum(h["ranks"]) == 20 for h in dyn.history)
    moved_steps = [h["step"] for h in dyn.history[1:] if h["moves"]]
    assert all(dyn.schedule.reallocates_at(s) for s in moved_steps)
    assert max(moved_steps) <= 40 - 6, "ranks are frozen in the final phase"
    assert dyn.ranks != {p: r for p, r in zip(dyn.paths, dyn.history[0]["ranks"])}


def test_schedule_steps():
    s = RankSchedule(total_steps=20, interval=3, warmup_steps=4, final_steps=5)
    assert [t for t in range(1, 21) if s.reallocates_at(t)] == [7, 10, 13]
    d = RankSchedule(total_steps=100, interval=10)
    assert (d.warmup_steps, d.final_steps) == (10, 25)


def test_sensitivity_is_adalora_smoothing_of_w_times_grad_per_rank():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=12, total_steps=10, interval=2, beta1=0.85, beta2=0.85)
    randomize_b(dyn)
    opt = torch.optim.SGD(dyn.trainable_parameters(), lr=0.0)  # lr 0: weights stay, grads stay
    dyn.bind_optimizer(opt)
    model(**batch(), labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    raw = [
        float(sum((p.detach() * p.grad).abs().sum() for p in (l.lora_A, l.lora_B))) / l.rank
        for l in dyn.layers.values()
    ]
    opt.step()
    dyn.step()
    ipt = [0.15 * v for v in raw]
    unc = [0.15 * abs(v - i) for v, i in zip(raw, ipt)]
    assert dyn.scores() == pytest.approx({p: i * u for p, i, u in zip(dyn.paths, ipt, unc)}, rel=1e-9)


def test_grad_norm_importance_runs_and_moves_ranks():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(
        model,
        TARGETS,
        budget=12,
        total_steps=20,
        interval=2,
        warmup_steps=2,
        final_steps=2,
        importance="grad_norm",
    )
    train(model, dyn, 20)
    assert sum(dyn.ranks.values()) == 12 and len(dyn.history) > 1


# ------------------------------------------------------------------ grow / shrink
@pytest.mark.parametrize("gate", [False, True], ids=["no-gate", "gate"])
def test_grow_leaves_the_output_unchanged(gate):
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=12, total_steps=10, input_gate=gate)
    randomize_b(dyn)
    if gate:
        with torch.no_grad():
            for layer in dyn.layers.values():
                layer.input_gate.u.normal_()
    with torch.no_grad():
        before = model(**batch()).logits
        path = dyn.paths[2]
        dyn.set_rank(path, 5)
        after = model(**batch()).logits
    layer = dyn.layers[path]
    assert layer.rank == 5 and layer.lora_A.shape == (5, 32) and layer.lora_B.shape == (32, 5)
    assert torch.all(layer.lora_B[:, 2:] == 0) and torch.all(layer.lora_A[2:] != 0)
    assert torch.allclose(after, before, rtol=0, atol=1e-6), (after - before).abs().max()


def test_shrink_keeps_the_best_rank_r_approximation():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=36, total_steps=10)
    randomize_b(dyn)
    path = dyn.paths[1]
    layer = dyn.layers[path]
    delta = (layer.lora_B @ layer.lora_A).detach().double()
    dyn.set_rank(path, 3)
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    new_a, new_b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    got = new_b @ new_a
    assert (got - best).norm() / best.norm() < 1e-6
    # Eckart-Young: the error is the norm of the dropped singular values
    assert (delta - got).norm().item() == pytest.approx(s[3:].norm().item(), rel=1e-6)
    # balanced factors: B'^T B' = A' A'^T = diag(S_r)
    assert torch.allclose(new_b.T @ new_b, torch.diag(s[:3]), atol=1e-5)
    assert torch.allclose(new_a @ new_a.T, torch.diag(s[:3]), atol=1e-5)


def test_shrink_of_a_zero_delta_redraws_a_so_components_can_learn():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=24, total_steps=10)  # B = 0: B A = 0
    path = dyn.paths[0]
    dyn.set_rank(path, 2)
    layer = dyn.layers[path]
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum(1).min() > 0


# ------------------------------------------------------------------ optimizer state
def test_optimizer_state_has_the_right_shapes_after_reallocation():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(
        model,
        TARGETS,
        budget=18,
        total_steps=30,
        interval=2,
        warmup_steps=2,
        final_steps=2,
        input_gate=True,
        modules_to_save=["classifier"],
    )

    def check(dyn, opt, moved):
        held = [p for g in opt.param_groups for p in g["params"]]
        for layer in dyn.layers.values():
            for p in (layer.lora_A, layer.lora_B):
                assert any(p is q for q in held), "the optimizer must keep the same parameter objects"
                state = opt.state[p]
                assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
                assert torch.all(state["exp_avg_sq"] >= 0)

    train(model, dyn, 30, check=check)
    assert len(dyn.history) > 1 and any(h["moves"] for h in dyn.history)


def test_shrink_carries_first_moments_exactly_through_the_change_of_basis():
    """When the dropped singular value is 0 the model is unchanged, so the momentum (= last gradient
    with SGD momentum, one step, lr 0) mapped by the shrink must equal the gradient at the new factors."""
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=24, total_steps=10)
    randomize_b(dyn)
    path = dyn.paths[3]
    layer = dyn.layers[path]
    with torch.no_grad():
        layer.lora_B[:, -1] = 0  # B A has rank 3 < 4
    opt = torch.optim.SGD(dyn.trainable_parameters(), lr=0.0, momentum=0.9)
    dyn.bind_optimizer(opt)
    labels = torch.tensor([0, 1, 2, 1])
    model(**batch(), labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    dyn.set_rank(path, 3)
    model(**batch(), labels=labels).loss.backward()
    for p in (layer.lora_A, layer.lora_B):
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape
        assert torch.allclose(buf, p.grad, rtol=1e-4, atol=1e-7), (buf - p.grad).abs().max()


def test_unsupported_optimizer_state_is_refused():
    model, _ = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=12, total_steps=10)
    opt = torch.optim.Adagrad(dyn.trainable_parameters())
    dyn.bind_optimizer(opt)
    model(**batch(), labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="optimizer state 'sum'"):
        dyn.set_rank(dyn.paths[0], 3)


# ------------------------------------------------------------------ export
def _base_copy(model_with_lora, cfg):
    base = BertForSequenceClassification(cfg).eval()
    state = {
        k.replace(".base.", "."): v
        for k, v in model_with_lora.state_dict().items()
        if ".lora_" not in k and ".input_gate." not in k
    }
    base.load_state_dict(state)
    return base


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model, cfg = tiny_bert()
    dyn = DynamicLoRA(
        model,
        TARGETS,
        budget=16,
        total_steps=24,
        interval=2,
        warmup_steps=2,
        final_steps=4,
        input_gate=True,
        modules_to_save=["classifier"],
    )
    train(model, dyn, 24, lr=2e-2)
    assert len(set(dyn.ranks.values())) > 1, "the test needs mixed ranks (rank_pattern)"
    with pytest.warns(UserWarning, match="PEFT"):
        dyn.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for path, rank in dyn.ranks.items():
        r = config["rank_pattern"].get(path, config["r"])
        alpha = config["alpha_pattern"].get(path, config["lora_alpha"])
        assert r == rank and alpha / r == pytest.approx(dyn.scale)
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert tensors[f"base_model.model.{dyn.paths[0]}.lora_A.weight"].shape == (dyn.ranks[dyn.paths[0]], 32)
    assert "base_model.model.classifier.weight" in tensors
    assert (tmp_path / "ad" / GATE_FILE).is_file()

    peft_model = peft.PeftModel.from_pretrained(_base_copy(model, cfg), tmp_path / "ad").eval()
    with torch.no_grad():
        with dyn.gate_disabled():
            ours = model(**batch(7)).logits
        gated = model(**batch(7)).logits
        theirs = peft_model(**batch(7)).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(gated, theirs, atol=1e-4), "the trained gate should change the output"


def test_saved_adapter_loads_in_dlp_attach_with_peft_logits(tmp_path):
    peft = pytest.importorskip("peft")
    if not hasattr(dlplora_triton, "attach"):
        pytest.skip("dlplora_triton.attach is not available")
    model, cfg = tiny_bert()
    dyn = DynamicLoRA(model, TARGETS, budget=14, total_steps=24, interval=2, warmup_steps=2, final_steps=4)
    train(model, dyn, 24, lr=2e-2)
    assert len(set(dyn.ranks.values())) > 1
    dyn.save_pretrained(tmp_path / "ad")
    peft_model = peft.PeftModel.from_pretrained(_base_copy(model, cfg), tmp_path / "ad").eval()
    served = _base_copy(model, cfg)
    lora = dlplora_triton.attach(served, {"dyn": str(tmp_path / "ad")})
    inputs = batch(3)
    lora.select([[("dyn", 1.0)]] * inputs["input_ids"].shape[0])
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
        ours = served(**inputs).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()


# ------------------------------------------------------------------ finetune entry point
WORDS = [
    "open",
    "file",
    "read",
    "write",
    "socket",
    "network",
    "user",
    "group",
    "disk",
    "mount",
    "print",
    "format",
    "config",
    "kernel",
    "memory",
    "process",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    model, _ = tiny_bert(labels=2)
    model.config.hidden_dropout_prob = 0.1  # dropout draws from the torch RNG: resuming must restore it
    model.save_pretrained(folder)
    return folder


def _write_data(folder, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % 2
        pool = WORDS[:8] if label == 0 else WORDS[8:]
        words = [pool[j] for j in torch.randint(0, 8, (6,), generator=g).tolist()]
        rows.append({"text": " ".join(words), "label": ["a", "b"][label]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _finetune_args(model_dir, data, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--train",
        str(data),
        "--eval",
        str(data),
        "--out",
        str(out),
        "--target-modules",
        "query,value",
        "--budget",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--interval",
        "2",
        "--warmup-steps",
        "1",
        "--final-steps",
        "2",
        "--lr",
        "0.02",
        "--checkpoint-every",
        "3",
        "--no-progress",
        "--gate",
        *extra,
    ]


def test_finetune_resumes_to_the_same_result(tiny_model_dir, tmp_path, capsys):
    data = _write_data(tmp_path)
    assert finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "full")) == 0
    assert finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "split", "--stop-after", "6")) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert not (tmp_path / "split" / "adapter").exists()
    assert finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "split", "--resume")) == 0
    full = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == split.keys()
    for key in full:
        assert full[key].shape == split[key].shape
        assert torch.allclose(full[key], split[key], rtol=0, atol=1e-6), key
    assert (
        load_file(tmp_path / "full" / "adapter" / GATE_FILE).keys()
        == load_file(tmp_path / "split" / "adapter" / GATE_FILE).keys()
    )
    assert (tmp_path / "full" / "ranks.csv").read_text() == (tmp_path / "split" / "ranks.csv").read_text()
    history = json.loads((tmp_path / "full" / "adapter" / "dlplora_dynamic.json").read_text())["history"]
    assert any(h["moves"] and h["step"] > 6 for h in history), "a reallocation must happen after the resume"
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert sum(summary["final_ranks"].values()) == 8 and len(summary["metrics"]) == 2
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the finetune/bench extra
        assert (tmp_path / "full" / "ranks.png").stat().st_size > 1000
    rows = (tmp_path / "full" / "ranks.csv").read_text().splitlines()
    assert rows[0] == "step,module,rank,score" and len(rows) > 1 + 4


def test_finetune_bad_paths_and_data(tiny_model_dir, tmp_path):
    data = _write_data(tmp_path)
    with pytest.raises(FileNotFoundError, match="--train data: .*nope.jsonl' does not exist"):
        finetune_main(_finetune_args(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="model directory"):
        finetune_main(_finetune_args(tmp_path / "no_model", data, tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "fresh", "--resume"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b", "label": "x"}\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the object has no 'label'"):
        read_labelled_jsonl(bad, "label")
    bad.write_text('{"text": "a b", "label": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_labelled_jsonl(bad, "label")
    with pytest.raises(ValueError, match="--budget must be positive"):
        finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "o") + ["--budget", "0"])
    with pytest.raises(ValueError, match="below the number of adapted modules"):
        finetune_main(_finetune_args(tiny_model_dir, data, tmp_path / "o") + ["--budget", "3"])


# ------------------------------------------------------------------ Trainer
def _trainer_run(out, resume=None):
    from transformers import Trainer, TrainingArguments

    model, _ = tiny_bert()
    dyn = DynamicLoRA(
        model, TARGETS, budget=15, interval=2, warmup_steps=2, final_steps=2, modules_to_save=["classifier"]
    )  # total_steps comes from the Trainer
    if resume is not None:
        dyn.load_state_dict(torch.load(resume / dyn.callback().STATE_FILE, weights_only=True))
    rows = []
    for i in range(48):
        b = batch(i, rows=1)
        rows.append(
            {
                "input_ids": b["input_ids"][0],
                "attention_mask": b["attention_mask"][0],
                "labels": torch.tensor(i % 3),
            }
        )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=6,
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )  # the Trainer's default optimizer: fused AdamW
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[dyn.callback()]).train(
        resume_from_checkpoint=None if resume is None else str(resume)
    )
    return dyn


def test_trainer_callback_reallocates_and_resumes_exactly(tmp_path):
    import shutil

    pytest.importorskip("accelerate")  # the Trainer needs it (installed with peft, a dev extra)

    full = _trainer_run(tmp_path / "full")
    assert full.schedule.total_steps == 12 and full.global_step == 12
    assert sum(full.ranks.values()) == 15
    assert any(h["moves"] and h["step"] == 6 for h in full.history), "the checkpoint step reallocates"
    assert any(h["moves"] and h["step"] > 6 for h in full.history)
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed = _trainer_run(tmp_path / "resumed", resume=tmp_path / "resumed" / "checkpoint-6")
    assert resumed.ranks == full.ranks
    for path in full.paths:
        for name in ("lora_A", "lora_B"):
            a, b = getattr(full.layers[path], name), getattr(resumed.layers[path], name)
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (path, name)


def test_fused_adamw_after_reallocation_matches_the_plain_implementation():
    """Shrunk factors come out of the SVD column-major; fused AdamW needs them contiguous."""
    results = []
    for fused in (True, False):
        model, _ = tiny_bert()
        dyn = DynamicLoRA(
            model, TARGETS, budget=15, total_steps=14, interval=2, warmup_steps=2, final_steps=2
        )
        opt = torch.optim.AdamW(
            dyn.trainable_parameters(), lr=2e-2, fused=fused, foreach=False if not fused else None
        )
        dyn.bind_optimizer(opt)
        for t in range(14):
            model(**batch(t), labels=torch.tensor([0, 1, 2, 1])).loss.backward()
            opt.step()
            dyn.step()
            opt.zero_grad()
            for layer in dyn.layers.values():
                assert layer.lora_A.is_contiguous() and layer.lora_B.is_contiguous()
        results.append(
            torch.cat([torch.cat([l.lora_A.flatten(), l.lora_B.flatten()]) for l in dyn.layers.values()])
        )
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ bad arguments
def test_bad_arguments_raise_clear_errors():
    model, _ = tiny_bert()
    with pytest.raises(ValueError, match=r"budget 5 is below the number of adapted modules \(6\)"):
        DynamicLoRA(model, TARGETS, budget=5)
    with pytest.raises(ValueError, match="target module 'qurey' matches no module"):
        DynamicLoRA(model, ["qurey"], budget=8)
    with pytest.raises(ValueError, match="is a BertAttention; DynamicLoRA adapts nn.Linear modules only"):
        DynamicLoRA(model, ["attention"], budget=8)
    with pytest.raises(ValueError, match="interval .* must be a positive int, got 0"):
        DynamicLoRA(model, TARGETS, budget=8, interval=0)
    with pytest.raises(ValueError, match="interval .* must be a positive int, got -3"):
        RankSchedule(total_steps=10, interval=-3)
    with pytest.raises(ValueError, match="leaves no step"):
        DynamicLoRA(model, TARGETS, budget=8, total_steps=10, warmup_steps=5, final_steps=5)
    with pytest.raises(ValueError, match="importance must be one of"):
        DynamicLoRA(model, TARGETS, budget=8, importance="fisher-ish")
    with pytest.raises(ValueError, match="exceeds 6 modules x max_rank 2"):
        DynamicLoRA(model, TARGETS, budget=13, max_rank=2)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        DynamicLoRA(model, TARGETS, budget=8, modules_to_save=["head"])
    assert not any(isinstance(m, DynamicLoRALinear) for m in model.modules()), (
        "failed calls leave the model as it was"
    )

    dyn = DynamicLoRA(model, TARGETS, budget=8, total_steps=10)
    with pytest.raises(ValueError, match="already carries a DynamicLoRA adapter"):
        DynamicLoRA(model, TARGETS, budget=8)
    with pytest.raises(RuntimeError, match="no optimizer bound"):
        dyn.step()
    with pytest.raises(ValueError, match="the optimizer does not hold lora_A"):
        dyn.bind_optimizer(torch.optim.AdamW(model.classifier.parameters()))
    dyn.bind_optimizer(torch.optim.AdamW(dyn.trainable_parameters()))
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        dyn.step()
    with pytest.raises(ValueError, match="must be an int in"):
        dyn.set_rank(dyn.paths[0], 0)
    with pytest.raises(KeyError, match="unknown adapted module"):
        dyn.set_rank("bert.nope", 2)
    dyn.detach()
    assert all(
        type(m) is nn.Linear for p, m in model.named_modules() if p in match_target_modules(model, TARGETS)
    )
    assert math.isclose(
        sum(p.numel() for p in model.parameters()), sum(p.numel() for p in tiny_bert()[0].parameters())
    )


def test_regex_target_modules_match_like_peft():
    model, _ = tiny_bert()
    assert match_target_modules(model, "all-linear") == [
        p for p, m in model.named_modules() if type(m) is nn.Linear
    ]
    paths = match_target_modules(model, r".*layer\.1\.attention\.self\.(query|key)")
    assert paths == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="matches no module path"):
            match_target_modules(model, r"nothing\.here")
