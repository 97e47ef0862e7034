"""One default top-p across the package: the API, the commands, the demos and `dlplora serve` (0.8, chosen
from the SmolLM2 experiment; dlplora_triton/defaults.py and the README say why)."""

import inspect

import dlplora_triton as dlp
from dlplora_triton import cli, defaults
from dlplora_triton.commands import serve
from dlplora_triton.demo import real_model
from dlplora_triton.generation import generate_routed
from dlplora_triton.integrations.vllm import routed
from dlplora_triton.routing import DEFAULT_P


def _default(fn, name="p"):
    return inspect.signature(fn).parameters[name].default


def test_every_default_p_is_the_packages():
    assert DEFAULT_P == 0.8
    api = {
        "top_p_select": _default(dlp.top_p_select),
        "Router.route": _default(dlp.Router.route),
        "Router.route_tensors": _default(dlp.Router.route_tensors),
        "generate_routed": _default(generate_routed),
    }
    parser = cli._build_parser()
    commands = {
        name: parser.parse_args([name, "--router", "r", "x", *extra]).p
        for name, extra in (("route", []), ("generate", ["--model", "m", "--adapters", "a"]))
    }
    others = {
        "defaults.DEFAULT_P": defaults.DEFAULT_P,
        "demo": real_model.ROUTING["p"],
        "dlplora serve --p": serve.build_parser().parse_args(["--adapters", "a", "--router", "r"]).p,
        "routed.DEFAULT_P": routed.DEFAULT_P,
    }
    assert set(api.values()) | set(commands.values()) | set(others.values()) == {DEFAULT_P}, (
        api,
        commands,
        others,
    )
