"""Build ``dlplora_triton/data/router_texts.jsonl`` (shipped in the package): a real multi-language, multi-topic sentence set for the router.

    python bench/data/build_router_data.py            # rewrites router_texts.jsonl, prints the composition

Every sentence comes from text installed on a Debian 12 machine; nothing is generated from templates and
nothing is downloaded. Tasks (one label per line, {"text": ..., "task": ...}):

    de, fr, es, ja, ru, zh   translated man pages under /usr/share/man/<lang>/ (zh: zh_CN + zh_TW): the Debian
                             packages passwd, login, apt, dpkg, dpkg-dev, man-db, procps, psmisc,
                             adduser, debianutils, vim-common, xz-utils, ... Translations by the Debian
                             and upstream translation teams; GPL-2+ (shadow, dpkg, apt, man-db, procps),
                             the Vim license (vim), public domain/0BSD (xz), see /usr/share/doc/<pkg>/copyright.
    shell                    English man pages of commands, sections 1 and 8 (/usr/share/man/man{1,8};
                             the generated gcloud pages excluded): git, openssl, systemd, coreutils, ...
                             under the licenses of the packages that ship them (mostly GPL/BSD/MIT).
    code                     statements of the Python standard library's source, 1-6 lines each
                             (/usr/lib/python3.11, tests excluded; PSF license).
    license                  license texts: /usr/share/common-licenses/* (base-files) and the
                             /usr/share/doc/*/copyright files (the license texts are themselves freely
                             redistributable verbatim).

Translated pages keep untranslated English paragraphs (po4a); a sentence is kept for a language task
only when it passes a script/stop-word check for that language and does not occur in the English pages
(all sections). The English man pages of the C API (sections 2, 3) are not a task: their sentences
read like those of the command pages (a first version with them as a task "clib" measured 85% on clib
and 74% on shell), and Python docstrings were replaced by source statements for the same reason.
A normalised sentence that occurs under two tasks is dropped everywhere. Selection is deterministic:
files are read in sorted order, and each task keeps the ``--per-task`` sentences with the smallest
BLAKE2b hash (a fixed pseudo-random sample spread over all files), and the file is ordered by hash, so
any prefix holds every task. The output depends only on the installed files (two runs give the same
bytes), and the committed JSONL, shipped in the package, is what the tests, benchmarks and demo use.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

MAN = Path("/usr/share/man")
PYLIB = Path("/usr/lib/python3.11")
OUT = Path(__file__).resolve().parents[2] / "dlplora_triton" / "data" / "router_texts.jsonl"
MIN_CHARS, MAX_CHARS = 20, 300
LANGS = {"de": ["de"], "fr": ["fr"], "es": ["es"], "ja": ["ja"], "ru": ["ru"], "zh": ["zh_CN", "zh_TW"]}

# ---------------------------------------------------------------------------------------------------
# roff -> plain text

# Named glyphs that carry meaning in running text; every other \(xx / \[xxx] escape is dropped.
_GLYPHS = {
    "aq": "'",
    "dq": '"',
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "em": "—",
    "en": "–",
    "hy": "-",
    "mi": "-",
    "bu": "•",
    "co": "©",
    "rg": "®",
    "tm": "™",
    "de": "°",
    "ga": "`",
    "ha": "^",
    "ti": "~",
    "Fo": "«",
    "Fc": "»",
    "fo": "‹",
    "fc": "›",
    "r!": "¡",
    "r?": "¿",
    "ss": "ß",
    "mu": "×",
    "di": "÷",
    ":a": "ä",
    ":o": "ö",
    ":u": "ü",
    ":A": "Ä",
    ":O": "Ö",
    ":U": "Ü",
    "'e": "é",
    "`e": "è",
    "^e": "ê",
    "'a": "á",
    "`a": "à",
    "^a": "â",
    ",c": "ç",
    "'o": "ó",
    "^o": "ô",
    "'i": "í",
    "^i": "î",
    "'u": "ú",
    "`u": "ù",
    "^u": "û",
    "~n": "ñ",
    "'E": "É",
    ":e": "ë",
    ":i": "ï",
    "sl": "/",
    "rs": "\\",
    "ba": "|",
    "at": "@",
    "sh": "#",
    "Do": "$",
    "ct": "¢",
    "Eu": "€",
    "eu": "€",
    "Po": "£",
    "la": "<",
    "ra": ">",
    "<-": "←",
    "->": "→",
    "<=": "≤",
    ">=": "≥",
    "!=": "≠",
    "pl": "+",
    "eq": "=",
    "ua": "↑",
    "da": "↓",
}
_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\([A-Za-z0-9]{2}|[A-Za-z0-9])"  # font changes
    r"|s[-+]?(?:\d|\(\d\d|\[\d+\])"  # size changes
    r"|\*(?:\[([^\]]*)\]|\((..)|(.))"  # strings: \*(lq \*[Aq]
    r"|\((..)|\[([^\]]*)\]"  # glyphs: \(em \[em]
    r"|[kmnMVYgz](?:\[[^\]]*\]|\(..|.)"  # registers, colours: dropped with their argument
    r"|[hvwlLDNoXbxRSAB]'[^']*'"  # motions, widths, device controls: dropped
    r"|(.)"  # one-character escapes
    r")"
)
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`", '"': ""}
# Man macros whose arguments are running text: the alternating-font macros join their arguments without
# spaces (.BR open (2) -> "open(2)"), the single-font ones with spaces.
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_TEXT_MACROS = {"B", "I", "SM", "SB"}
# Blocks that are tables, examples or code, never sentences.
_SKIP_BLOCKS = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "PS": "PE", "ig": ".", "de": "..", "am": ".."}


def _escape(match: re.Match) -> str:
    string = match.group(1) or match.group(2) or match.group(3)
    if string is not None:
        return _GLYPHS.get(string, "'" if string == "Aq" else "")
    glyph = match.group(4) or match.group(5)
    if glyph is not None:
        return _GLYPHS.get(glyph, "")
    char = match.group(6)
    if char is not None:
        return _ONE_CHAR.get(char, "")
    return ""


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


# Sections of English pages that are about authorship and licensing, not the command: their sentences
# would be label noise between the "shell" and "license" tasks.
_SKIP_SECTIONS = {
    "AUTHOR",
    "AUTHORS",
    "COPYRIGHT",
    "LICENSE",
    "LICENCE",
    "COPYING",
    "COLOPHON",
    "HISTORY",
    "REPORTING BUGS",
    "AVAILABILITY",
    "TRANSLATION",
    "TRANSLATOR",
    "TRANSLATORS",
}


def roff_paragraphs(source: str) -> list[str]:
    """Plain-text paragraphs of a man(7) page: markup removed; examples, tables, headers and the
    authorship/licensing sections skipped."""
    paragraphs, current, skip_until, skip_section = [], [], None, False
    for raw in source.splitlines():
        line = raw.rstrip()
        if skip_until is not None:
            if (
                line.startswith((".", "'"))
                and line[1:].split()[:1] == [skip_until.lstrip(".")]
                or (skip_until in (".", "..") and line.strip() == skip_until)
            ):
                skip_until = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            name = parts[0] if parts else ""
            rest = parts[1] if len(parts) > 1 else ""
            if name in _SKIP_BLOCKS:
                skip_until = _SKIP_BLOCKS[name]
                continue
            if name in _ALTERNATING:
                current.append("".join(_macro_args(rest)))
            elif name in _TEXT_MACROS:
                current.append(" ".join(_macro_args(rest)))
            else:  # .PP .TP .IP .SH .RS .br .sp ...: a paragraph boundary; header and tag text dropped
                if current and not skip_section:
                    paragraphs.append(" ".join(current))
                current = []
                if name in ("SH", "Sh"):
                    header = _ESCAPE.sub(_escape, " ".join(_macro_args(rest))).strip().upper()
                    skip_section = header in _SKIP_SECTIONS
            continue
        current.append(line)
    if current and not skip_section:
        paragraphs.append(" ".join(current))
    return [_ESCAPE.sub(_escape, p) for p in paragraphs]


# ---------------------------------------------------------------------------------------------------
# sentences and language checks

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_UKRAINIAN = re.compile(r"[іїєґІЇЄҐ]")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[\"'«(\[]?[A-ZÀ-ÖØ-ÞА-ЯЁ0-9¿¡])|(?<=[。！？])")
_WORD = re.compile(r"[^\W\d_]+")
_STOP = {
    "en": set("the and of to is are be that this with for by from which not or an it can as on if".split()),
    "de": set(
        "der die das und ist nicht ein eine mit für von zu den dem des werden wird auf oder sie wenn "
        "auch als bei sind kann einen einer durch".split()
    ),
    "fr": set(
        "le la les et est une un des du pour dans pas qui que ce sont avec par sur ou être "
        "cette peut au aux ne si".split()
    ),
    "es": set(
        "el la los las y es un una de del para con que por se no en como al su este esta puede son si".split()
    ),
}


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"\s+", " ", text).strip()
    # Lines of Japanese/Chinese pages are joined with a space; CJK text has none between characters.
    return re.sub(r"(?<=[\u3000-\u9fff\uff00-\uffef]) (?=[\u3000-\u9fff\uff00-\uffef])", "", text)


def sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph with MIN_CHARS..MAX_CHARS characters and mostly letters."""
    out = []
    for sentence in _SENTENCE_END.split(_clean(paragraph)):
        sentence = sentence.strip()
        if not MIN_CHARS <= len(sentence) <= MAX_CHARS:
            continue
        letters = sum(ch.isalpha() for ch in sentence)
        if (
            letters < 0.6 * len(sentence.replace(" ", ""))
            or len(_WORD.findall(sentence)) < 3
            and not _CJK.search(sentence)
        ):
            continue  # option lists, paths, numbers, code fragments
        out.append(sentence)
    return out


def in_language(sentence: str, lang: str) -> bool:
    """Whether a sentence of a translated page is really in that language (po4a leaves English in)."""
    letters = max(1, sum(ch.isalpha() for ch in sentence))
    if lang == "ja":
        return len(_KANA.findall(sentence)) >= 3 and len(_CJK.findall(sentence)) > 0.3 * letters
    if lang == "zh":
        return not _KANA.search(sentence) and len(_CJK.findall(sentence)) > 0.5 * letters
    if lang == "ru":
        return len(_CYRILLIC.findall(sentence)) > 0.6 * letters and not _UKRAINIAN.search(sentence)
    words = [w.lower() for w in _WORD.findall(sentence)]
    own = sum(w in _STOP[lang] for w in words)
    english = sum(w in _STOP["en"] for w in words)
    return own >= 2 and own > english


def is_english(sentence: str) -> bool:
    words = [w.lower() for w in _WORD.findall(sentence)]
    return sum(w in _STOP["en"] for w in words) >= 2 and sentence.isascii()


def _key(sentence: str) -> str:
    return re.sub(r"\W+", " ", sentence.lower()).strip()


# ---------------------------------------------------------------------------------------------------
# sources


def _man_files(folders: list[Path], sections: str) -> list[Path]:
    files = []
    for folder in folders:
        for section in sections:
            d = folder / f"man{section}"
            if d.is_dir():
                # gcloud's ~16k generated pages would swamp section 1 (and are not in the OS image);
                # "::" and .3pm are Perl module pages, not the C API.
                files += [
                    f
                    for f in d.glob("*.gz")
                    if f.is_file()
                    and not f.name.startswith("gcloud")
                    and "::" not in f.name
                    and ".3pm." not in f.name
                ]
    return sorted(files)


def _fix_mojibake(text: str) -> str:
    """UTF-8 that was read as Latin-1 and written out again ("Ã³" for "ó", seen in the es pages)."""
    if "Ã" not in text and "Â" not in text:
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def man_sentences(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError):
            continue
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError:
            source = data.decode("latin-1")  # a few older translations are still in ISO 8859-1
        if ".so " in source[:200] and len(source) < 200:
            continue  # a link to another page
        for paragraph in roff_paragraphs(source):
            out += sentences(_fix_mojibake(paragraph))
    return out


# Simple statements worth a prompt: calls, assignments, returns, raises, asserts (not bare docstrings).
_CODE_NODES = (
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Return,
    ast.Raise,
    ast.Assert,
    ast.Expr,
    ast.If,
    ast.For,
    ast.With,
)


def python_code(root: Path) -> list[str]:
    """Statements of the Python standard library's source (tests excluded), 1 to 6 lines, dedented."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3") for p in rel):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.split("\n")  # as ast counts lines (splitlines also breaks at \f, \x1c, ...)
        for node in ast.walk(tree):
            if not isinstance(node, _CODE_NODES) or node.end_lineno - node.lineno > 5:
                continue
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                continue  # docstrings and bare names
            segment = lines[node.lineno - 1 : node.end_lineno]
            indent = node.col_offset
            if any(l[:indent].strip() for l in segment):
                continue  # a statement sharing its line with another (a; b)
            text = "\n".join(l[indent:].rstrip() for l in segment)
            if MIN_CHARS <= len(text) <= MAX_CHARS and sum(ch.isalpha() for ch in text) >= 0.4 * len(text):
                out.append(text)
    return out


def _dep5_license_text(text: str) -> str:
    """The License: fields of a machine-readable (DEP-5) copyright file, "." lines as paragraph breaks.

    The other fields (Files, Copyright, Comment, Upstream-Contact, ...) are packaging metadata and
    notes, not license text.
    """
    keep, out = False, []
    for line in text.splitlines():
        if line[:1] not in (" ", "\t", ""):
            field, _, value = line.partition(":")
            keep = field.strip().lower() == "license"
            out.append("")  # the short name after "License:" (GPL-2+) is no sentence
            continue
        if keep:
            out.append("" if line.strip() == "." else line.strip())
    return "\n".join(out)


def license_sentences() -> list[str]:
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))
    out = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if text.startswith("Format:"):
            text = _dep5_license_text(text)
        # Copyright lines name holders and years, not license terms.
        text = "\n".join(
            l for l in text.splitlines() if not l.strip().startswith(("Copyright", "(C)", "(c)", "©"))
        )
        for paragraph in re.split(r"\n\s*\n", text):
            out += [s for s in sentences(paragraph) if is_english(s)]
    return out


def collect(per_task: int) -> tuple[list[dict], dict[str, str]]:
    """The selected rows and a one-line source description per task."""
    english_man = man_sentences(_man_files([MAN], "12345678"))
    english_keys = {_key(s) for s in english_man}
    commands = man_sentences(_man_files([MAN], "18"))
    raw: dict[str, list[str]] = {
        "shell": [s for s in commands if is_english(s)],
        "code": python_code(PYLIB),
        "license": license_sentences(),
    }
    sources = {
        "shell": "English man pages of commands, sections 1 and 8 (/usr/share/man/man{1,8})",
        "code": f"Python standard library source statements ({PYLIB})",
        "license": "/usr/share/common-licenses/* and /usr/share/doc/*/copyright",
    }
    for task, folders in LANGS.items():
        files = _man_files([MAN / f for f in folders], "12345678")
        raw[task] = [s for s in man_sentences(files) if in_language(s, task) and _key(s) not in english_keys]
        where = ", ".join(f"/usr/share/man/{f}/" for f in folders)
        sources[task] = f"translated man pages, {where} ({len(files)} pages)"
    # Dedupe within a task; drop a sentence found under two tasks (it cannot be labelled).
    owners: dict[str, set[str]] = defaultdict(set)
    first: dict[tuple[str, str], str] = {}
    for task, items in raw.items():
        for s in items:
            owners[_key(s)].add(task)
            first.setdefault((task, _key(s)), s)
    rows = []
    for task in sorted(raw):
        unique = [s for (t, k), s in first.items() if t == task and len(owners[k]) == 1]
        unique.sort(key=lambda s: hashlib.blake2b(s.encode(), digest_size=8).digest())
        rows += [{"text": s, "task": task} for s in unique[:per_task]]
        sources[task] += f": {len(unique)} distinct sentences, kept {min(per_task, len(unique))}"
    return rows, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=1450, help="sentences kept per task (default 1450)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not MAN.is_dir():
        print(f"error: {MAN} not found: this script reads the man pages of a Debian machine", file=sys.stderr)
        return 2
    rows, sources = collect(args.per_task)
    # Order rows by hash, not by task, so that any prefix of the file holds every task.
    rows.sort(key=lambda r: hashlib.blake2b((r["task"] + "\t" + r["text"]).encode(), digest_size=8).digest())
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = Counter(r["task"] for r in rows)
    for task in sorted(sources):
        print(f"{task:8s} {counts[task]:5d}  {sources[task]}")
    print(f"{len(rows)} sentences, {args.out.stat().st_size / 1e6:.2f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
