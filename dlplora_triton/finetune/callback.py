"""Driving :class:`DynamicLoRA` from ``transformers.Trainer``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from ..readers import read_torch_state

if TYPE_CHECKING:
    from .dynamic import DynamicLoRA

__all__ = ["DynamicLoRACallback"]


class DynamicLoRACallback(TrainerCallback):
    """Drives a :class:`DynamicLoRA` from ``transformers.Trainer``.

    ``on_train_begin``: sets ``total_steps`` from the Trainer's ``max_steps`` when it was not given.
    ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``): :meth:`DynamicLoRA.step`.
    ``on_save``: writes the controller state as ``dlplora_dynamic.pt`` into the checkpoint folder. To
    resume, call :meth:`load_checkpoint` with that folder before
    ``trainer.train(resume_from_checkpoint=ckpt)``, so the model has the saved ranks when the Trainer
    loads its weights and optimizer state.
    """

    STATE_FILE = "dlplora_dynamic.pt"

    def __init__(self, dynamic: DynamicLoRA):
        self.dynamic = dynamic

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore the controller state :meth:`on_save` wrote into ``folder`` (a ``checkpoint-N``
        folder). FileNotFoundError / ValueError naming the file when it is missing or broken; then
        nothing has changed."""
        path = Path(folder) / self.STATE_FILE
        self.dynamic.load_state_dict(read_torch_state(path, "DynamicLoRA checkpoint"), source=str(path))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.dynamic.schedule is None:
            self.dynamic.set_total_steps(int(state.max_steps))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.dynamic.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.dynamic.state_dict(), folder / self.STATE_FILE)
