"""PEFT serving the same per-row adapter mixes as ``lora.select``: the demo's check and baseline.

Each distinct mix is merged with ``add_weighted_adapter(..., combination_type="cat")`` (the exact
equivalent of a weighted sum of LoRA outputs) and the batch runs with PEFT's ``adapter_names``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

__all__ = ["peft_mixed_batch"]


def peft_mixed_batch(model, adapter_paths: dict[str, Path], selection: Sequence[Sequence[tuple[str, float]]]):
    """PEFT serving the same per-row mixes: each distinct mix merged with ``add_weighted_adapter``
    ("cat", the exact equivalent of a weighted sum of LoRA outputs) and run as a mixed batch.

    Returns ``(peft_model, adapter_names)``: pass ``adapter_names`` to the PEFT model's forward or
    ``generate``; rows with an empty mix get ``"__base__"``.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = list(adapter_paths)
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(model), str(adapter_paths[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_paths[name]), adapter_name=name)
    mixes: dict[tuple, str] = {}
    row_names = []
    for row in selection:
        if not row:
            row_names.append("__base__")
            continue
        key = tuple(row)
        if key not in mixes:
            mixes[key] = f"mix{len(mixes)}"
            peft_model.add_weighted_adapter(
                [n for n, _ in row], [w for _, w in row], adapter_name=mixes[key], combination_type="cat"
            )
            # peft copies use_rslora of the first adapter onto the merged one; the "cat" factors
            # already carry each adapter's scale, so the merged adapter's own scaling must be 1.
            for module in peft_model.modules():
                if isinstance(module, LoraLayer) and mixes[key] in module.scaling:
                    module.scaling[mixes[key]] = 1.0
        row_names.append(mixes[key])
    return peft_model.eval(), row_names
