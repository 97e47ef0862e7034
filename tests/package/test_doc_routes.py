"""Every route README.md and docs/*.md show is what the documented router gives.

The documented router is the one ``dlplora train-router`` command the docs show (the same arguments
wherever it appears); it is trained once for this module (about 15 s on 2 idle cores, up to 60 s on
busy ones). The routes are read from the docs themselves, so the test follows the docs and the text set
when either changes:

- ``dlplora route --router router/ "A" "B" ...`` in a block, and the next block, marked
  ``<!-- doctest: text (what the block above prints) -->``: the command is run and must print that block;
- a routed request with ``"model": "auto"`` (a curl ``"prompt"``, or an openai chat ``messages`` with one
  user message) whose block shows the answer in a comment: ``# x-dlplora-route: <route>`` (and
  ``"model": "<name>"``), or ``# <route> <model>`` after a ``print(raw.headers["x-dlplora-route"], ...)``:
  the route is ``Router.route`` with the ``--p`` / ``--top-k`` / ``--max-loras`` of the ``dlplora serve``
  line shown before it in the same doc, and the block's ``"top_k"`` override if it has one, written as the
  server writes its header (``base`` or ``<adapter>=<weight>,...``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from dlplora_triton.defaults import DEFAULT_P, SERVE_TOP_K

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
MARKER_BEFORE = re.compile(r"<!-- doctest: (\w+)([^>]*)-->\s*$")
CURL_PROMPT = re.compile(r'"model": "auto", "prompt": "([^"]+)"')
CHAT_PROMPT = re.compile(r'model="auto", messages=\[\{"role": "user", "content": "([^"]+)"\}\]')
HEADER_COMMENT = re.compile(r'#\s*x-dlplora-route: (\S+)(?:\s+"model": "([^"]+)")?')
PRINT_COMMENT = re.compile(
    r'print\(raw\.headers\["x-dlplora-route"\], raw\.parse\(\)\.model\)\s*#\s*(\S+) (\S+)'
)
TOP_K_OVERRIDE = re.compile(r'"top_k": (\d+)')
AUTO_REQUEST = re.compile(r'"model":\s*"auto"|model="auto"')  # what a routed request in a block looks like


def _blocks(doc: Path) -> list[tuple[str, str]]:
    """``(marker kind and argument, code)`` of each fenced block of ``doc``, in order."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = MARKER_BEFORE.search(before)
        out.append((f"{marker.group(1)}{marker.group(2)}".strip() if marker else "", match.group(1)))
    return out


def _commands(code: str) -> list[list[str]]:
    """The ``dlplora`` command lines of a block as argument lists (continuation lines joined); other
    lines (Python, curl) are not split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.startswith("dlplora ")]


def _resolve(words: list[str]) -> list[str]:
    """The words with ``$(dlplora data --path NAME)`` and the checkout's data paths made absolute."""
    from dlplora_triton.commands.data import path_of

    out = []
    for word in words:
        word = re.sub(r"\$\(dlplora data --path ([\w-]+)\)", lambda m: str(path_of(m.group(1))), word)
        if word.startswith("dlplora_triton/"):
            word = str(ROOT / word)
        out.append(word)
    return out


def _option(words: list[str], name: str, default=None):
    return words[words.index(name) + 1] if name in words else default


def _shown_train_commands() -> list[list[str]]:
    found = []
    for doc in DOCS:
        for _, code in _blocks(doc):
            found += [w for w in _commands(code) if w[:2] == ["dlplora", "train-router"]]
    return found


@pytest.fixture(scope="module")
def documented_router(tmp_path_factory):
    """``(router, folder)``: the router of the docs' ``dlplora train-router`` command, trained once."""
    from dlplora_triton.cli import main
    from dlplora_triton.routing import Router

    commands = {tuple(_resolve(words)) for words in _shown_train_commands()}
    assert len(commands) == 1, f"the docs show different train-router commands: {sorted(commands)}"
    (words,) = commands
    out = tmp_path_factory.mktemp("documented") / _option(list(words), "--out")
    words = list(words)
    words[words.index("--out") + 1] = str(out)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(words[1:]) == 0
    return Router.load(out), out


def _route_commands() -> list[tuple[str, list[str], str]]:
    """``(where, dlplora route command, the output block after it)`` of every doc."""
    found = []
    for doc in DOCS:
        blocks = _blocks(doc)
        for i, (_, code) in enumerate(blocks):
            for words in _commands(code):
                if words[:2] == ["dlplora", "route"]:
                    marker, shown = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
                    assert marker.startswith("text"), (
                        f"{doc.name}: `dlplora route` is not followed by the block it prints "
                        "(<!-- doctest: text (what the block above prints) -->)"
                    )
                    found.append((doc.name, words, shown))
    return found


def _served_routes() -> list[tuple[str, str, dict, str, str | None]]:
    """``(where, prompt, route options, shown header, shown model)`` of every routed request shown."""
    found = []
    for doc in DOCS:
        serve = None
        for _, code in _blocks(doc):
            for words in _commands(code):
                if words[:2] == ["dlplora", "serve"]:
                    serve = words
            for pattern, comment in ((CURL_PROMPT, HEADER_COMMENT), (CHAT_PROMPT, PRINT_COMMENT)):
                for prompt in pattern.findall(code):
                    shown = comment.search(code)
                    assert shown, f"{doc.name}: the routed request for {prompt!r} does not show its route"
                    assert serve is not None, f"{doc.name}: a routed request before any `dlplora serve`"
                    max_loras = int(_option(serve, "--max-loras", 1 << 30))
                    top_k = int(_option(serve, "--top-k", SERVE_TOP_K))
                    override = TOP_K_OVERRIDE.search(code)
                    options = {
                        "p": float(_option(serve, "--p", DEFAULT_P)),
                        "top_k": min(int(override.group(1)) if override else top_k, max_loras),
                    }
                    found.append((doc.name, prompt, options, shown.group(1), shown.group(2)))
            if AUTO_REQUEST.search(code) and not (CURL_PROMPT.search(code) or CHAT_PROMPT.search(code)):
                raise AssertionError(f"{doc.name}: a routed request this test cannot read:\n{code}")
    return found


def test_the_docs_show_routes_to_check():
    # the parsers found what the docs show (README and docs/vllm.md both route requests and prompts)
    assert len(_shown_train_commands()) >= 2
    assert len(_route_commands()) >= 1
    served = _served_routes()
    assert len(served) >= 4 and {where for where, *_ in served} >= {"README.md", "vllm.md"}


@pytest.mark.parametrize(
    "where, words, shown",
    [pytest.param(*case, id=f"{case[0]}:{' '.join(case[1][:2])}") for case in _route_commands()],
)
def test_dlplora_route_prints_what_the_docs_show(documented_router, where, words, shown):
    from dlplora_triton.cli import main

    _, folder = documented_router
    words = list(words)
    words[words.index("--router") + 1] = str(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(words[1:]) == 0
    assert printed.getvalue().strip() == shown.strip(), (
        f"{where}: `{shlex.join(words[:2])} ...` prints otherwise"
    )


def _header(route: list[tuple[str, float]]) -> str:
    # as integrations/vllm/routed.py writes x-dlplora-route
    return ",".join(f"{name}={weight!r}" for name, weight in route) or "base"


@pytest.mark.parametrize(
    "where, prompt, options, header, model",
    [pytest.param(*case, id=f"{case[0]}:{case[1]}") for case in _served_routes()],
)
def test_routed_requests_get_the_route_the_docs_show(
    documented_router, where, prompt, options, header, model
):
    router, _ = documented_router
    (route,) = router.route([prompt], **options)
    got = _header(route)
    shown = dict(pair.split("=") for pair in header.split(",")) if header != "base" else {}
    names_match = [n for n, _ in route] == list(shown)
    weights_match = all(
        abs(w - float(shown[n])) <= 0.5 * 10 ** -len(shown[n].split(".")[-1]) for n, w in route if n in shown
    )
    assert names_match and weights_match, f"{where}: {prompt!r} routes to {got}, the doc shows {header}"
    if model is not None and len(route) == 1:
        assert model == route[0][0], (
            f"{where}: {prompt!r} is answered by {route[0][0]}, the doc shows {model}"
        )
