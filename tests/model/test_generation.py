"""Route once at prefill, reuse through decode: generate_routed on a tiny random Llama."""

import pytest
import torch

import dlplora_triton as dlp
from dlplora_triton import patch as patch_module
from dlplora_triton.demo.tasks import load_texts as load_router_texts
from dlplora_triton.demo.toy_model import build_llama, build_tokenizer, make_peft_adapters

TASKS = ("de", "ja", "code")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    texts, tasks = load_router_texts()
    keep = [i for i, t in enumerate(tasks) if t in TASKS]
    per_task = {t: [i for i in keep if tasks[i] == t] for t in TASKS}
    train = [i for t in TASKS for i in per_task[t][:150]]
    router = dlp.Router.train(
        [texts[i] for i in train],
        [tasks[i] for i in train],
        num_buckets=2**12,
        hidden=(32,),
        epochs=8,
        seed=0,
    )
    prompts = [texts[per_task[t][-1]] for t in TASKS] + [texts[per_task["de"][-2]][:40]]
    tokenizer = build_tokenizer([texts[i] for i in train], vocab_size=300)
    model = build_llama(len(tokenizer), hidden=32, intermediate=64, layers=2, heads=2, seed=0)
    specs = {
        t: {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        for t, r in zip(TASKS, (4, 8, 2))
    }
    paths = make_peft_adapters(model, specs, tmp_path_factory.mktemp("adapters"))
    saved = tmp_path_factory.mktemp("model")  # for the command-line test, which loads it from disk
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    lora = dlp.attach(model, paths)
    yield model, lora, router, tokenizer, prompts, paths, saved
    lora.detach()


def _alone(model, lora, tokenizer, prompt, mix, max_new_tokens):
    batch = tokenizer([prompt], return_tensors="pt")
    with lora.selection([mix]):
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, batch["input_ids"].shape[1] :].tolist()


def test_batch_equals_each_prompt_alone(system):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    results = dlp.generate_routed(
        model, lora, router, tokenizer, prompts, p=0.9, max_new_tokens=6, do_sample=False
    )
    assert [r.prompt for r in results] == prompts
    assert any(r.adapters for r in results)
    for result in results:
        assert result.token_ids == _alone(model, lora, tokenizer, result.prompt, result.adapters, 6)
        assert result.route_s > 0 and result.prefill_s > 0 and result.decode_s > 0


def test_routes_once_and_builds_one_plan_per_phase(system, monkeypatch):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    routed, built = [], []
    real_route, real_build = router.route, patch_module.prepare_batch
    monkeypatch.setattr(
        router, "route", lambda texts, **kw: routed.append(list(texts)) or real_route(texts, **kw)
    )
    monkeypatch.setattr(
        patch_module,
        "prepare_batch",
        lambda *a, **kw: built.append(kw.get("num_tokens")) or real_build(*a, **kw),
    )
    dlp.generate_routed(model, lora, router, tokenizer, prompts, max_new_tokens=5, do_sample=False)
    assert routed == [prompts], "the whole batch is routed once, before the first token"
    assert len(built) == 2, f"one plan at prefill, one reused by every decode step; built {built}"


def test_sampling_and_eos_arguments_pass_through(system):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    torch.manual_seed(0)
    results = dlp.generate_routed(
        model, lora, router, tokenizer, prompts[:2], max_new_tokens=4, do_sample=True, top_k=5
    )
    assert all(len(r.token_ids) == 4 for r in results)
    first = dlp.generate_routed(
        model, lora, router, tokenizer, prompts[:1], max_new_tokens=4, do_sample=False
    )[0]
    stopped = dlp.generate_routed(
        model,
        lora,
        router,
        tokenizer,
        prompts[:1],
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=first.token_ids[0],
    )[0]
    assert stopped.token_ids == first.token_ids[:1], "generation stops at the eos token"


def test_router_task_without_adapter_raises(system):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    lora.remove("code")
    try:
        with pytest.raises(KeyError, match="code"):
            dlp.generate_routed(model, lora, router, tokenizer, prompts, max_new_tokens=2)
    finally:
        lora.add("code", paths["code"])


def test_generate_command(system, tmp_path, capsys):
    import json

    from dlplora_triton.cli import main

    model, lora, router, tokenizer, prompts, paths, model_dir = system
    router.save(tmp_path / "router")
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--router",
        str(tmp_path / "router"),
        *[f"--adapter={name}={path}" for name, path in paths.items()],
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--json", *prompts[:2]]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = dlp.generate_routed(
        model, lora, router, tokenizer, prompts[:2], max_new_tokens=3, do_sample=False
    )
    assert [row["text"] for row in printed] == [r.text for r in expected]
    assert [[tuple(a) for a in row["adapters"]] for row in printed] == [r.adapters for r in expected]
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "nope"),
                "--router",
                str(tmp_path / "router"),
                "--adapter",
                "de=x",
                "hello",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_off_topic_prompts_run_on_the_base_model_in_the_same_batch(system):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    off_topic = ["hello, how are you?", "What is the capital of France?"]  # the examples
    batch = prompts[:2] + off_topic
    results = dlp.generate_routed(model, lora, router, tokenizer, batch, max_new_tokens=5, do_sample=False)
    assert [r.adapters == [] for r in results] == [False, False, True, True]
    for result in results:  # each row equals its own selection alone; [] is the base model
        assert result.token_ids == _alone(model, lora, tokenizer, result.prompt, result.adapters, 5)
    # base_threshold passes through: at 1.0 the router (almost) never abstains
    forced = dlp.generate_routed(
        model, lora, router, tokenizer, off_topic, base_threshold=1.0, max_new_tokens=1, do_sample=False
    )
    assert all(r.adapters for r in forced)


def test_chat_reads_the_template_and_routes_the_prompt_as_written(system, monkeypatch):
    model, lora, router, tokenizer, prompts, paths, model_dir = system
    with pytest.raises(ValueError, match="has no chat template"):
        dlp.generate_routed(model, lora, router, tokenizer, prompts, chat=True, max_new_tokens=2)
    template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    monkeypatch.setattr(tokenizer, "chat_template", template, raising=False)
    routed = []
    real_route = router.route
    monkeypatch.setattr(
        router, "route", lambda texts, **kw: routed.append(list(texts)) or real_route(texts, **kw)
    )
    results = dlp.generate_routed(
        model, lora, router, tokenizer, prompts, chat=True, max_new_tokens=4, do_sample=False
    )
    assert routed == [prompts] and [r.prompt for r in results] == prompts
    for result in results:  # each row: the templated prompt on its own selection
        templated = f"user: {result.prompt}\na:"
        assert result.token_ids == _alone(model, lora, tokenizer, templated, result.adapters, 4)
