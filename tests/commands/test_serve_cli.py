"""``dlplora serve`` stops before vLLM starts, with one line naming the problem, on a bad start-up.

The routed server itself runs in tests/integrations/vllm/engine/test_serve_routed.py (vLLM's CPU build); these checks
need no vLLM: everything here is decided before ``dlplora serve`` hands over to vLLM's server.
"""

import json
import shutil
from pathlib import Path

import pytest

from dlplora_triton.cli import main
from dlplora_triton.commands.serve import build_parser
from dlplora_triton.integrations.vllm.serve import (
    ServeError,
    adapter_directories,
    check_model,
    cpu_defaults,
    vllm_command,
)

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ROOT / "dlplora_triton" / "data" / "adapters" / "smollm2"


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    """A small router for the six adapters, trained on a slice of the package's text set."""
    from dlplora_triton.demo.tasks import load_texts
    from dlplora_triton.routing import Router

    texts, tasks = load_texts()
    keep = [(x, t) for x, t in zip(texts, tasks) if t in {"de", "fr", "ru", "ja", "zh", "code"}][::8]
    router = Router.train([x for x, _ in keep], [t for _, t in keep], epochs=2, background=None, seed=0)
    return router.save(tmp_path_factory.mktemp("router") / "router")


def _serve(args, capsys) -> tuple[int, str]:
    code = main(["serve", *args])
    return code, capsys.readouterr().err.strip()


def test_a_missing_router_stops_start_up(capsys, tmp_path):
    code, err = _serve(
        ["--adapters", str(ADAPTERS), "--router", str(tmp_path / "nope"), "--model", "m"], capsys
    )
    assert code == 2 and err.startswith("dlplora serve: error: --router") and "does not exist" in err


def test_a_broken_router_stops_start_up(capsys, router_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(router_dir, broken)
    config = next(p for p in broken.iterdir() if p.suffix == ".json")
    config.write_text("{ not json")
    code, err = _serve(["--adapters", str(ADAPTERS), "--router", str(broken), "--model", "m"], capsys)
    assert code == 2 and "--router" in err and len(err.splitlines()) == 1


def test_a_router_for_adapters_the_server_lacks_is_refused(capsys, router_dir, tmp_path):
    some = tmp_path / "some"
    some.mkdir()
    for name in ("de", "code"):
        (some / name).symlink_to(ADAPTERS / name)
    code, err = _serve(["--adapters", str(some), "--router", str(router_dir), "--model", "m"], capsys)
    assert code == 2 and "routes to ['fr', 'ja', 'ru', 'zh']" in err and "holds ['code', 'de']" in err


@pytest.mark.parametrize("what", ["missing", "empty", "truncated"])
def test_bad_adapter_directories_stop_start_up(capsys, router_dir, tmp_path, what):
    root = tmp_path / "adapters"
    if what != "missing":
        root.mkdir()
    if what == "truncated":
        shutil.copytree(ADAPTERS / "de", root / "de")
        weights = root / "de" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    code, err = _serve(["--adapters", str(root), "--router", str(router_dir), "--model", "m"], capsys)
    words = {"missing": "is not a directory", "empty": "holds no PEFT adapter", "truncated": "truncated"}[
        what
    ]
    assert code == 2 and words in err, err


def test_the_model_is_required_and_owned_flags_are_refused(capsys, router_dir):
    code, err = _serve(["--adapters", str(ADAPTERS), "--router", str(router_dir)], capsys)
    assert code == 2 and "--model" in err
    code, err = _serve(
        ["--adapters", str(ADAPTERS), "--router", str(router_dir), "--model", "m", "--middleware", "x.Y"],
        capsys,
    )
    assert code == 2 and "sets --middleware" in err


def test_bad_p_and_top_k(capsys, router_dir):
    for flag, value in (("--p", "0"), ("--p", "1.5"), ("--top-k", "0")):
        code, err = _serve(
            ["--adapters", str(ADAPTERS), "--router", str(router_dir), "--model", "m", flag, value], capsys
        )
        assert code == 2 and flag in err


def test_the_vllm_command_adds_what_routed_serving_needs():
    adapters = adapter_directories(ADAPTERS)
    assert sorted(adapters) == ["code", "de", "fr", "ja", "ru", "zh"]
    args, rest = build_parser().parse_known_args(
        ["--adapters", str(ADAPTERS), "--router", "r", "--model", "m", "--max-loras", "4"]
    )
    cmd = vllm_command(args, rest, adapters)
    # vLLM's launcher where it has one (the .venv's vLLM does), not the deprecated api_server module.
    assert cmd[1:4] == ["-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]
    assert "--enable-lora" in cmd and "--enforce-eager" in cmd and "--max-loras" in cmd
    rank = max(json.loads((ADAPTERS / n / "adapter_config.json").read_text())["r"] for n in adapters)
    assert cmd[cmd.index("--max-lora-rank") + 1] == str(next(v for v in (8, 16, 32, 64) if v >= rank))
    assert cmd[cmd.index("--middleware") + 1].endswith("RoutingMiddleware")
    modules = cmd[cmd.index("--lora-modules") + 1 : cmd.index("--middleware")]
    assert modules == [f"{n}={(ADAPTERS / n).resolve()}" for n in sorted(adapters)]
    assert "--dtype" not in cmd  # the CPU defaults come in cpu_flags only


def test_answers_name_the_model_folder_not_its_path(tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    adapters = adapter_directories(ADAPTERS)
    args, rest = build_parser().parse_known_args(["--adapters", "a", "--router", "r", "--model", str(model)])
    cmd = vllm_command(args, rest, adapters)
    names = cmd[cmd.index("--served-model-name") + 1 : cmd.index("--lora-modules")]
    assert names == ["SmolLM2-135M-Instruct", str(model)]  # vLLM answers with the first
    args, rest = build_parser().parse_known_args(
        ["--adapters", "a", "--router", "r", "--model", str(model), "--served-model-name", "mine"]
    )
    assert vllm_command(args, rest, adapters).count("--served-model-name") == 1


def test_cpu_defaults_fit_the_machine_and_yield_to_given_flags():
    gib = 1 << 30
    flags = dict(zip(*[iter(cpu_defaults([], memory=(24 * gib, 20 * gib)))] * 2))
    assert flags == {"--dtype": "float32", "--max-model-len": "2048", "--gpu-memory-utilization": "0.16"}
    small = dict(zip(*[iter(cpu_defaults([], memory=(4 * gib, 2 * gib)))] * 2))
    assert float(small["--gpu-memory-utilization"]) * 4 <= 1.0  # at most half of what is available
    assert (
        cpu_defaults(["--dtype", "bfloat16", "--max-model-len=512", "--gpu-memory-utilization", "0.3"]) == []
    )


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "without config.json"),
        (lambda p: ADAPTERS / "de", "is a LoRA adapter folder"),
    ],
)
def test_a_bad_model_is_named_before_vllm_starts(tmp_path, make, words):
    with pytest.raises(ServeError, match=words):
        check_model(str(make(tmp_path)))


def test_hub_names_are_left_to_vllm():
    for name in ("m", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        check_model(name)


def test_serve_without_vllm_says_so_in_one_line(monkeypatch, capsys, router_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    code, err = _serve(["--adapters", str(ADAPTERS), "--router", str(router_dir), "--model", "m"], capsys)
    assert code == 2 and "vLLM is not installed" in err and len(err.strip().splitlines()) == 1


def test_max_loras_follows_top_k():
    adapters = adapter_directories(ADAPTERS)

    def command(*extra):
        args, rest = build_parser().parse_known_args(
            ["--adapters", "a", "--router", "r", "--model", "m", *extra]
        )
        return vllm_command(args, rest, adapters)

    cmd = command("--top-k", "2")  # vLLM's default, 1, would refuse every routed mix
    assert cmd[cmd.index("--max-loras") + 1] == "2"
    cmd = command("--top-k", "2", "--max-loras=6")
    assert cmd.count("--max-loras") == 0 and "--max-loras=6" in cmd
    with pytest.raises(ServeError, match="below --top-k 3"):
        command("--top-k", "3", "--max-loras", "2")
    with pytest.raises(ServeError, match="must be an integer"):
        command("--max-loras=x")


def test_runtime_updates_get_one_api_server(monkeypatch):
    """Each API server process holds its own router: a runtime load or unload reaches one of them."""
    adapters = adapter_directories(ADAPTERS)

    def command(*extra):
        args, rest = build_parser().parse_known_args(
            ["--adapters", "a", "--router", "r", "--model", "m", *extra]
        )
        return vllm_command(args, rest, adapters)

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert "--api-server-count" not in command("--data-parallel-size", "2")  # one router each, all equal
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert "--api-server-count" not in command()
    cmd = command("--data-parallel-size", "2")  # vLLM would start one API server per rank
    assert cmd[cmd.index("--api-server-count") + 1] == "1"
    assert command("-dp", "2", "--api-server-count", "1").count("--api-server-count") == 1
    for flags in (("--api-server-count", "2"), ("-asc=3",), ("-dp", "2", "--api-server-count", "x")):
        with pytest.raises(ServeError, match="runtime updates need one API server"):
            command(*flags)


def test_serve_puts_the_mix_key_in_vllms_environment(monkeypatch, router_dir):
    import os

    seen = {}
    monkeypatch.delenv("DLPLORA_MIX_KEY", raising=False)
    monkeypatch.setattr(os, "execve", lambda path, argv, env: seen.update(env=env))
    assert main(["serve", "--adapters", str(ADAPTERS), "--router", str(router_dir), "--model", "m"]) == 0
    assert len(seen["env"]["DLPLORA_MIX_KEY"]) == 64


def test_tenants_and_save_router_reach_vllms_environment_and_never_the_command_line(
    monkeypatch, router_dir, tmp_path, capsys
):
    import os

    key = "tenant-key-0123456789"
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": [{"name": "a", "key": key, "adapters": ["de"]}]}))
    os.chmod(tenants, 0o600)
    seen = {}
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.setattr(os, "execve", lambda path, argv, env: seen.update(argv=argv, env=env))
    base = ["serve", "--adapters", str(ADAPTERS), "--router", str(router_dir), "--model", "m"]
    assert main([*base, "--tenants", str(tenants), "--save-router", str(tmp_path / "saved")]) == 0
    assert seen["env"]["DLPLORA_TENANTS_FILE"] == str(tenants.resolve())
    assert seen["env"]["DLPLORA_ROUTER_SAVE_DIR"] == str((tmp_path / "saved").resolve())
    assert key not in " ".join(seen["argv"]) + capsys.readouterr().err
    monkeypatch.setenv("DLPLORA_TENANTS_FILE", str(tenants))  # not inherited: only what --tenants says
    assert main(base) == 0 and "DLPLORA_TENANTS_FILE" not in seen["env"]

    code, err = _serve([*base[1:], "--tenants", str(tenants), "--api-key", "x"], capsys)
    assert code == 2 and "--tenants replaces vLLM's --api-key" in err
    tenants.write_text(json.dumps({"tenants": [{"name": "a", "key": "short", "adapters": ["de"]}]}))
    code, err = _serve([*base[1:], "--tenants", str(tenants)], capsys)
    assert code == 2 and "--tenants:" in err and "at least 16" in err and "short" not in err.split(":", 2)[2]
    code, err = _serve([*base[1:], "--save-router", str(tenants)], capsys)
    assert code == 2 and "--save-router" in err and "is a file" in err
