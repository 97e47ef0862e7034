"""The engine tests' server start limit (engine/engine_util.py), checked without vLLM: it comes from
$DLPLORA_TEST_SERVER_START_S, and running out of it names that variable."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "engine_util_for_start_limit", Path(__file__).parent / "engine" / "engine_util.py"
)
engine_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_util)


def test_the_limit_defaults_to_600_s_and_reads_the_variable(monkeypatch):
    monkeypatch.delenv(engine_util.SERVER_START_ENV, raising=False)
    assert engine_util.server_start_limit() == 600
    monkeypatch.setenv(engine_util.SERVER_START_ENV, "1200")
    assert engine_util.server_start_limit() == 1200


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(engine_util.SERVER_START_ENV, value)
    with pytest.raises(ValueError, match=f"DLPLORA_TEST_SERVER_START_S={value!r} is not a positive"):
        engine_util.server_start_limit()


def test_a_server_that_never_answers_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(engine_util.SERVER_START_ENV, "1")
    never = [sys.executable, "-c", "import sys, time; time.sleep(60)"]
    with pytest.raises(
        RuntimeError, match=r"within 1 s \(a busy machine: raise the limit with DLPLORA_TEST_"
    ):
        engine_util.Server([], tmp_path / "server.log", command=never)
    assert (tmp_path / "server.log").exists()  # kept for the reader
