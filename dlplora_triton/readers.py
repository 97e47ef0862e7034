"""Readers for the files the package takes in: JSONL data, JSON configs, safetensors, torch checkpoints.

Every reader takes ``owner``, what the file belongs to (``"adapter 'math'"``, ``"router at 'r/'"``,
``"training data"``), and raises ``FileNotFoundError`` for a missing file or ``ValueError`` for a
broken one (empty, truncated, not UTF-8, not JSON, not an object, garbage bytes), the message naming
the owner and the file. Nothing is returned until the whole file has been read and checked.

The commands also check the paths they will *write* before any work (:func:`check_output_dir`,
:func:`check_output_file`): a training run never ends in "cannot write there".
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "read_jsonl",
    "read_labelled_jsonl",
    "read_json_object",
    "read_safetensors",
    "read_torch_state",
    "check_output_dir",
    "check_output_file",
]


def _existing_file(path: str | os.PathLike, owner: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{owner}: {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{owner}: {str(path)!r} is not a file")
    return path


def _read_text(path: Path, owner: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{owner}: {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None


def read_jsonl(path: str | os.PathLike, owner: str, keys: Sequence[str] = ()) -> list[dict]:
    """The objects of a JSONL file, one per non-blank line, each holding every key of ``keys``.

    Raises FileNotFoundError for a missing file, ValueError naming ``owner``, the file and the line for
    a line that is not a JSON object or lacks a key, and for a file without any line.
    """
    return [row for _, row in _numbered_rows(path, owner, keys)]


def _numbered_rows(path: str | os.PathLike, owner: str, keys: Sequence[str]) -> list[tuple[int, dict]]:
    path = _existing_file(path, owner)
    rows = []
    for number, line in enumerate(_read_text(path, owner).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{owner}: {path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{owner}: {path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(
                f"{owner}: {path}:{number}: the object has no {', '.join(repr(k) for k in missing)} "
                f"(each line needs {', '.join(repr(k) for k in keys)})"
            )
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{owner}: {str(path)!r} holds no lines of data")
    return rows


def read_labelled_jsonl(
    path: str | os.PathLike,
    label_key: str = "task",
    labels: Sequence[str] | None = None,
    owner: str = "labelled data",
    int_labels: bool = True,
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of a JSONL file whose lines are ``{"text": str, <label_key>: str | int}``.

    Texts must be non-empty strings; labels strings or integers (``int_labels``; else strings only, as
    ``Router.train`` takes task names), returned as strings; with ``labels`` given, every label must be
    one of them. Errors as :func:`read_jsonl`, naming file and line.
    """
    texts, out = [], []
    for number, row in _numbered_rows(path, owner, ("text", label_key)):
        text, label = row["text"], row[label_key]
        where = f"{owner}: {path}:{number}"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{where}: "text" must be a non-empty string, got {text!r}')
        if not int_labels and not isinstance(label, str):
            number = isinstance(label, (int, float)) and not isinstance(label, bool)
            hint = f' (write "{label}" if that is its name)' if number else ""
            raise ValueError(
                f"{where}: {label_key!r} must be a task name, a non-empty string; got "
                f"{type(label).__name__} {json.dumps(label)}{hint}"
            )
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            kind = "a non-empty string or an int" if int_labels else "a non-empty string"
            raise ValueError(f"{where}: {label_key!r} must be {kind}, got {label!r}")
        label = str(label)
        if labels is not None and label not in labels:
            raise ValueError(f"{where}: {label_key} {label!r} is not one of {list(labels)}")
        texts.append(text)
        out.append(label)
    return texts, out


def read_json_object(path: str | os.PathLike, owner: str) -> dict:
    """The JSON object in ``path``. ValueError naming ``owner`` and the file when it is not one."""
    path = _existing_file(path, owner)
    text = _read_text(path, owner)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        what = "empty" if not text.strip() else f"not valid JSON ({err.msg} at line {err.lineno})"
        raise ValueError(f"{owner}: {str(path)!r} is {what}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{owner}: {str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike, owner: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU. ValueError naming ``owner`` and the file for an
    empty, truncated or non-safetensors file (instead of the safetensors library's own error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing_file(path, owner)
    if path.stat().st_size == 0:
        raise ValueError(f"{owner}: {str(path)!r} is empty (expected a safetensors file)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(
            f"{owner}: {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None


def read_torch_state(path: str | os.PathLike, owner: str) -> dict:
    """A ``torch.save``'d dict of tensors and plain values (``weights_only=True``: no code is run).
    ValueError naming ``owner`` and the file for an empty, truncated or foreign file."""
    path = _existing_file(path, owner)
    if path.stat().st_size == 0:
        raise ValueError(f"{owner}: {str(path)!r} is empty (expected a torch checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{owner}: {str(path)!r} is not a readable torch checkpoint (truncated, corrupt, or holding more "
            f"than tensors and plain values: {type(err).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that a folder can be written at ``path`` (existing, or created later with
    its parents); ``ValueError`` naming ``what`` (``"--out"``) and the path otherwise. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; it takes a folder (created if missing)")
    _check_writable_ancestor(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its folder exists and is
    writable; the path is not a folder); ``ValueError`` naming ``what`` and the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; it takes a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        why = "is a file" if parent.exists() else "does not exist"
        raise ValueError(f"{what} {str(path)!r}: its folder {str(parent)!r} {why}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {str(path)!r}: no permission to write there")
    return path


def _check_writable_ancestor(path: Path, what: str) -> None:
    """The deepest existing ancestor of ``path`` must be a writable folder (mkdir(parents=True) works)."""
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(ancestor)!r} is a file, so no folder can be made there")
    if not os.access(ancestor if str(ancestor) else Path("."), os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: no permission to write in {str(ancestor)!r}")
