"""docs/milora.md's first code sample runs as written (in a temporary folder: it writes mi/)."""

import re
import warnings
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "milora.md"


def test_the_milora_doc_sample_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate's notes on a model without a pad token
        exec(compile(code, str(DOC), "exec"), scope)
    lora = scope["lora"]
    assert lora.gates("mi").shape == (2, 2, 7)
    assert (lora.gates("mi")[1] == 0).all()  # the base row
    assert (tmp_path / "mi" / "milora_config.json").is_file()
