"""Build ``dlplora_triton/data/router_texts.jsonl`` (shipped in the package): a real multi-language, multi-topic text set for the router.

    python bench/data/build_router_data.py            # rewrites router_texts.jsonl, prints the composition

Every text comes from files installed on a Debian 12 machine; nothing is generated from templates and
nothing is downloaded. One row a line: {"text": ..., "task": ..., "source": ...}; ``source`` names
where the text was read: ``man:<page>`` (a man page), ``mo:<catalogue>`` (a gettext catalogue,
/usr/share/locale/<lang>/LC_MESSAGES/<catalogue>.mo), ``stdlib:<file>`` / ``dist-packages:<file>``
(Python), ``license:<file>``, ``<task>:<file>`` for the other code tasks.

34 tasks. The first version's nine (11,335 rows, kept exactly: the SmolLM2 adapters, the demo and
the benchmarks built on them read only these rows, ``dlplora_triton.demo.tasks.load_texts``):

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

Added in the second version (``--per-extra`` rows each, selected after the first version's):

    de, fr, es, ja, ru, zh   program messages: the translated strings of the gettext catalogues
                             /usr/share/locale/<lang>/LC_MESSAGES/*.mo (coreutils, apt, dpkg, git, gnupg2,
                             glib20, postgresql-15, binutils, tar, systemd, ...; catalogues of names --
                             iso_*, xkeyboard-config, shared-mime-info -- skipped), under the licences of
                             their packages (mostly GPL-2+/GPL-3+/LGPL-2.1+, PostgreSQL, MIT).
    code                     statements of the Python packages in /usr/lib/python3/dist-packages (apt,
                             requests, urllib3, yaml, pkg_resources, oauthlib, ...: MIT, Apache-2.0,
                             BSD, GPL-2+ for python-apt).

and, added last (``--per-late`` rows each): the import statements (``import os``, ``from x import (a, b)``;
source ``imports:stdlib/<file>`` or ``imports:dist-packages/<file>``) and the block headers (``for x
in y:``, ``class A(B):``; source ``headers:...``) of both Python trees, which the statements above
never are: without them ``import numpy as np`` and ``while True:`` went to the base model.

and 25 tasks (``--per-added-task`` rows each):

    it pt pl nl sv da uk ko  translated man pages (/usr/share/man/<lang>/; pt: pt and pt_BR) and program
    tr ro cs id hu fi        messages (/usr/share/locale/<lang>/), as above (same packages, same licences)
    bg ca el vi              program messages only (no translated man pages installed)
    c                        C headers, /usr/include (libc6-dev: LGPL-2.1+; linux-libc-dev: GPL-2 with
                             the syscall note; libssl-dev: Apache-2.0; zlib, ...)
    perl                     Perl modules, /usr/share/perl/5.36 (perl-modules: GPL-1+ or Artistic) and
                             /usr/share/perl5 (debconf: BSD-2-Clause; dpkg-dev: GPL-2+; ...)
    javascript               npm's source, /usr/lib/node_modules/npm (package nodejs; npm: Artistic-2.0,
                             its bundled modules ISC / MIT / BSD)
    vim                      Vim script, /usr/share/vim/vim90 (vim-runtime: the Vim license)
    cmake                    CMake modules, /usr/share/cmake-3.25/Modules (cmake-data: BSD-3-Clause)
    sql                      /usr/share/postgresql/15 (postgresql-15: the PostgreSQL licence)
    shellscript              sh / bash scripts in /usr/bin, /usr/sbin, /etc/init.d (their packages'
                             licences: GPL-2+, BSD, MIT, ...)

Code of the added kinds: runs of 1 to 4 consecutive non-blank lines, comments removed (they hold
English prose and licence headers), at least 40% letters. Messages: each translated string split into
sentences like the man pages' paragraphs; a message identical to its English original is
untranslated and skipped. Language checks: the first version's (below) for its tasks; for the added
languages their script (uk needs a letter only Ukrainian has; bg none of them and none of ы э ё) or
at least two of the language's own short words and more of them than English ones.

Translated pages keep untranslated English paragraphs (po4a); a sentence is kept for a language task
only when it passes a script/stop-word check for that language and does not occur in the English pages
(all sections). The English man pages of the C API (sections 2, 3) are not a task: their sentences
read like those of the command pages (a first version with them as a task "clib" measured 85% on clib
and 74% on shell), and Python docstrings were replaced by source statements for the same reason.
A normalised text that occurs under two tasks is dropped (the first version's nine tasks dedupe among
themselves only, so their rows stay; an added text is dropped when it occurs under any other task).
Selection is deterministic: files are read in sorted order, and each task keeps the texts with the
smallest BLAKE2b hash (a fixed pseudo-random sample spread over all files), and the file is ordered by
the hash of (task, text), so any prefix holds every task and the first version's rows keep their
order. The output depends only on the installed files (two runs give the same bytes), and the
committed JSONL, shipped in the package, is what the tests, benchmarks and demo use.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
import struct
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

MAN = Path("/usr/share/man")
PYLIB = Path("/usr/lib/python3.11")
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
LOCALE = Path("/usr/share/locale")
OUT = Path(__file__).resolve().parents[2] / "dlplora_triton" / "data" / "router_texts.jsonl"
MIN_CHARS, MAX_CHARS = 20, 300
MIN_SHORT_CHARS = 9  # the import statements and block headers: "import os", "else:" is too short
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
    # The languages added in the second version (only for the tasks added then; de, fr, es above are
    # unchanged so that those tasks select the same sentences).
    "it": set(
        "il la le lo gli di del della che è un una per con non sono da si nel alla questo può se".split()
    ),
    "pt": set(
        "o a os as de do da dos das que é um uma para com não em no na se por ao pode são este".split()
    ),
    "pl": set("i w na nie jest się z do że to od lub jak dla jeśli przez być może po są".split()),
    "nl": set("de het een van en is niet dat in op te met voor zijn wordt door als of worden kan er".split()),
    "sv": set("och att det är en ett som av för med på inte till den om kan har eller från de vid".split()),
    "da": set("og at det er en et som af for med på ikke til den om kan har eller fra de ved skal".split()),
    "tr": set("bir ve bu için ile da de olarak olan değil veya ya çok daha gibi kadar her ise".split()),
    "ro": set("și în de la nu este un o cu pentru se care din sau pe ca fi sunt acest dacă".split()),
    "cs": set("a je se v na že to s z do pro není jako nebo být jsou podle když při".split()),
    "id": set("dan yang di ke dari untuk ini itu dengan tidak adalah akan pada dapat atau oleh jika".split()),
    "ca": set("el la els les de del que és un una per amb no en es al als pot són si aquest".split()),
    "fi": set("ja on ei se että tai kun jos ole ovat tämä voi myös kuin mutta vain sen".split()),
    "hu": set("a az és nem egy hogy is van meg csak vagy ha már ki mint de el fel nincs".split()),
    "vi": set("của và các là không có được cho với một này để trong những khi đã từ".split()),
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


_SCRIPTS = {
    "uk": re.compile(r"[\u0400-\u04ff]"),
    "bg": re.compile(r"[\u0400-\u04ff]"),
    "ko": re.compile(r"[\uac00-\ud7af]"),
    "el": re.compile(r"[\u0370-\u03ff]"),
}


def in_added_language(sentence: str, lang: str) -> bool:
    """The language check of the tasks added in the second version: their script (uk with at least
    one letter only Ukrainian has, bg none of them and none of Russian's ы э ё), or at least two of
    the language's own short words and more of them than English ones."""
    letters = max(1, sum(ch.isalpha() for ch in sentence))
    if lang in _SCRIPTS:
        if len(_SCRIPTS[lang].findall(sentence)) <= 0.6 * letters:
            return False
        if lang == "uk":
            return bool(_UKRAINIAN.search(sentence))
        if lang == "bg":
            return not _UKRAINIAN.search(sentence) and not re.search(r"[ыэёЫЭЁ]", sentence)
        return True
    return in_language(sentence, lang)


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


def man_sentences(files: list[Path]) -> list[tuple[str, str]]:
    """(sentence, page) of man pages; the page is its file name without the .gz."""
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
        page = path.name.removesuffix(".gz")
        for paragraph in roff_paragraphs(source):
            out += [(s, page) for s in sentences(_fix_mojibake(paragraph))]
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


# Compound statements whose first line is a prompt of its own (``def f(x):``, ``for i in range(10):``).
_BLOCK_NODES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.For,
    ast.While,
    ast.If,
    ast.With,
    ast.Try,
)


def python_code(
    root: Path, nodes: tuple[type, ...] = _CODE_NODES, min_chars: int = MIN_CHARS, headers: bool = False
) -> list[tuple[str, str]]:
    """(statement, file) of the Python source under ``root`` (tests excluded), 1 to 6 lines, dedented:
    statements of the kinds ``nodes``, of ``min_chars`` to ``MAX_CHARS`` characters; with ``headers``
    only a compound statement's first line, when it is the whole header (``for x in y:``)."""
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
            if not isinstance(node, nodes) or (node.end_lineno - node.lineno > 5 and not headers):
                continue
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                continue  # docstrings and bare names
            segment = lines[node.lineno - 1 : node.lineno if headers else node.end_lineno]
            if headers and not segment[0].rstrip().endswith(":"):
                continue  # a header over several lines, or with its body on the same line
            indent = node.col_offset
            if any(l[:indent].strip() for l in segment):
                continue  # a statement sharing its line with another (a; b)
            text = "\n".join(l[indent:].rstrip() for l in segment)
            if min_chars <= len(text) <= MAX_CHARS and sum(ch.isalpha() for ch in text) >= 0.4 * len(text):
                out.append((text, str(path.relative_to(root))))
    return out


# ---------------------------------------------------------------------------------------------------
# sources of the second version: gettext catalogues and code in other languages


def mo_catalogue(path: Path) -> list[str]:
    """The translated strings of a GNU gettext .mo file (the first form of a plural; the header and
    untranslated entries skipped), read from the file's tables without Python's gettext (which needs
    a valid header)."""
    data = path.read_bytes()
    if len(data) < 28:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        return []
    count, originals, translations = struct.unpack(order + "III", data[8:20])
    out = []
    for i in range(count):
        o_len, o_off = struct.unpack(order + "II", data[originals + 8 * i : originals + 8 * i + 8])
        t_len, t_off = struct.unpack(order + "II", data[translations + 8 * i : translations + 8 * i + 8])
        original = data[o_off : o_off + o_len].split(b"\0")[0]
        translated = data[t_off : t_off + t_len].split(b"\0")[0]
        if not original or not translated or translated == original:
            continue
        try:
            out.append(translated.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return out


# Catalogues of names (countries, languages, currencies, keyboard layouts, MIME types), not messages.
_NAME_CATALOGUES = ("iso_", "iso-", "xkeyboard-config", "shared-mime-info", "gtk20-properties")


def mo_sentences(lang_dirs: list[str]) -> list[tuple[str, str]]:
    """(sentence, catalogue) of the program messages in /usr/share/locale/<lang>/LC_MESSAGES/*.mo."""
    out = []
    for lang_dir in lang_dirs:
        for path in sorted((LOCALE / lang_dir / "LC_MESSAGES").glob("*.mo")):
            if path.name.startswith(_NAME_CATALOGUES):
                continue
            domain = path.stem
            for message in mo_catalogue(path):
                # Keyboard accelerators (_File, &Open) and format directives are part of the message
                # as shipped; paragraphs are separated by blank lines.
                for paragraph in re.split(r"\n\s*\n", message):
                    out += [(s, domain) for s in sentences(paragraph)]
    return out


_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_HASH_COMMENT = re.compile(r"(?m)^\s*#(?!!).*$")


def _strip_comments(text: str, language: str) -> str:
    """Source text without comments (they hold English prose and licence headers, not code)."""
    if language in ("c", "javascript"):
        return _C_COMMENT.sub("", text)
    if language == "sql":
        return re.sub(r"(?m)--.*$", "", _C_COMMENT.sub("", text))
    if language == "vim":
        return re.sub(r'(?m)^\s*".*$', "", text)
    if language == "perl":
        text = re.sub(r"(?ms)^=[a-zA-Z].*?(^=cut\b.*?$|\Z)", "", text)  # POD
        text = text.split("\n__END__")[0].split("\n__DATA__")[0]
        return _HASH_COMMENT.sub("", text)
    if language == "cmake":
        return _HASH_COMMENT.sub("", re.sub(r"(?s)#\[(=*)\[.*?\]\1\]", "", text))
    return _HASH_COMMENT.sub("", text)  # shell scripts


def code_snippets(files: list[Path], language: str, root: Path) -> list[tuple[str, str]]:
    """(snippet, file) pairs: runs of 1 to 4 consecutive non-blank lines of each file, comments
    removed, dedented, MIN_CHARS..MAX_CHARS long and at least 40% letters (like the Python statements)."""
    out = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = _strip_comments(text.replace("\r\n", "\n"), language)
        source = str(path.relative_to(root))
        for block in re.split(r"\n\s*\n", text):
            lines = [l.rstrip() for l in block.split("\n") if l.strip()]
            for start in range(0, len(lines), 4):
                chunk = lines[start : start + 4]
                indent = min(len(l) - len(l.lstrip()) for l in chunk)
                snippet = "\n".join(l[indent:] for l in chunk)
                if MIN_CHARS <= len(snippet) <= MAX_CHARS and sum(
                    ch.isalpha() for ch in snippet
                ) >= 0.4 * len(snippet):
                    out.append((snippet, source))
    return out


def _scripts(folders: list[Path], shebang: re.Pattern) -> list[Path]:
    """Executable text files whose first line matches ``shebang``."""
    out = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                with open(path, "rb") as f:
                    first = f.readline(100)
            except OSError:
                continue
            if shebang.match(first.decode("latin-1")):
                out.append(path)
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


def license_sentences() -> list[tuple[str, str]]:
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
            out += [(s, str(path)) for s in sentences(paragraph) if is_english(s)]
    return out


# The tasks added in the second version. Languages: (man page folders, locale folders); code: (a
# function giving (snippet, file) pairs, what it reads).
ADDED_LANGS = {
    "it": (["it"], ["it"]),
    "pt": (["pt", "pt_BR"], ["pt", "pt_BR"]),
    "pl": (["pl"], ["pl"]),
    "nl": (["nl"], ["nl"]),
    "sv": (["sv"], ["sv"]),
    "da": (["da"], ["da"]),
    "uk": (["uk"], ["uk"]),
    "ko": (["ko"], ["ko"]),
    "tr": (["tr"], ["tr"]),
    "ro": (["ro"], ["ro"]),
    "cs": (["cs"], ["cs"]),
    "id": (["id"], ["id"]),
    "hu": (["hu"], ["hu"]),
    "bg": ([], ["bg"]),
    "ca": ([], ["ca"]),
    "el": ([], ["el"]),
    "vi": ([], ["vi"]),
    "fi": (["fi"], ["fi"]),
}
_SHEBANG_SH = re.compile(r"#! ?(/usr)?/bin/(env )?(ba|da)?sh\b")


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.is_symlink())


ADDED_CODE = {
    "c": (
        lambda: code_snippets(_files(Path("/usr/include"), "*.h"), "c", Path("/usr/include")),
        "C headers under /usr/include (libc6-dev, linux-libc-dev, ...)",
    ),
    "perl": (
        lambda: code_snippets(
            _files(Path("/usr/share/perl"), "*.pm") + _files(Path("/usr/share/perl5"), "*.pm"),
            "perl",
            Path("/usr/share"),
        ),
        "Perl modules under /usr/share/perl/5.36 (perl-modules) and /usr/share/perl5 (debconf, dpkg-dev, ...)",
    ),
    "javascript": (
        lambda: code_snippets(
            [p for p in _files(Path("/usr/lib/node_modules/npm"), "*.js") if ".min." not in p.name],
            "javascript",
            Path("/usr/lib/node_modules"),
        ),
        "npm's JavaScript under /usr/lib/node_modules/npm (package nodejs)",
    ),
    "vim": (
        lambda: code_snippets(
            _files(Path("/usr/share/vim/vim90"), "*.vim"), "vim", Path("/usr/share/vim/vim90")
        ),
        "Vim script under /usr/share/vim/vim90 (vim-runtime)",
    ),
    "cmake": (
        lambda: code_snippets(
            _files(Path("/usr/share/cmake-3.25/Modules"), "*.cmake"), "cmake", Path("/usr/share/cmake-3.25")
        ),
        "CMake modules under /usr/share/cmake-3.25/Modules (cmake-data)",
    ),
    "sql": (
        lambda: code_snippets(
            _files(Path("/usr/share/postgresql"), "*.sql"), "sql", Path("/usr/share/postgresql")
        ),
        "SQL of /usr/share/postgresql/15 (postgresql-15's extension scripts and system views)",
    ),
    "shellscript": (
        lambda: code_snippets(
            _scripts([Path("/usr/bin"), Path("/usr/sbin"), Path("/etc/init.d")], _SHEBANG_SH),
            "shell",
            Path("/"),
        ),
        "POSIX / bash scripts in /usr/bin, /usr/sbin, /etc/init.d",
    ),
}


def raw_sources() -> tuple[dict, dict, dict, list[dict], dict[str, str]]:
    """Every candidate (text, source) per task, before deduplication and selection: the first
    version's nine tasks, the added tasks, the added sources of the first nine tasks, the groups added
    last (import statements, block headers), and a one-line source description per task."""
    english_man = man_sentences(_man_files([MAN], "12345678"))
    english_keys = {_key(s) for s, _ in english_man}
    commands = man_sentences(_man_files([MAN], "18"))
    first: dict[str, list[tuple[str, str]]] = {
        "shell": [(s, "man:" + src) for s, src in commands if is_english(s)],
        "code": [(s, "stdlib:" + src) for s, src in python_code(PYLIB)],
        "license": [(s, "license:" + src) for s, src in license_sentences()],
    }
    sources = {
        "shell": "English man pages of commands, sections 1 and 8 (/usr/share/man/man{1,8})",
        "code": f"Python standard library source statements ({PYLIB})",
        "license": "/usr/share/common-licenses/* and /usr/share/doc/*/copyright",
    }
    for task, folders in LANGS.items():
        files = _man_files([MAN / f for f in folders], "12345678")
        first[task] = [
            (s, "man:" + src)
            for s, src in man_sentences(files)
            if in_language(s, task) and _key(s) not in english_keys
        ]
        where = ", ".join(f"/usr/share/man/{f}/" for f in folders)
        sources[task] = f"translated man pages, {where} ({len(files)} pages)"
    added: dict[str, list[tuple[str, str]]] = {}
    for task, (man_folders, locale_folders) in ADDED_LANGS.items():
        files = _man_files([MAN / f for f in man_folders], "12345678")
        man = [("man:" + src, s) for s, src in man_sentences(files)]
        mo = [("mo:" + src, s) for s, src in mo_sentences(locale_folders)]
        added[task] = [
            (s, src) for src, s in man + mo if in_added_language(s, task) and _key(s) not in english_keys
        ]
        where = [f"/usr/share/man/{f}/ ({len(files)} pages)" for f in man_folders[:1]] if man_folders else []
        where += [f"/usr/share/locale/{f}/LC_MESSAGES/*.mo" for f in locale_folders]
        sources[task] = (
            "translated man pages and program messages: " if man_folders else "program messages: "
        ) + ", ".join(where)
    for task, (read, where) in ADDED_CODE.items():
        added[task] = [(s, f"{task}:{src}") for s, src in read()]
        sources[task] = f"{where}, comments removed"
    # More sources for the first version's tasks (rows added after theirs; the shipped rows stay): their
    # program messages, and Python code outside the standard library. A router that saw only man pages
    # abstains on most program messages (docs/routing.md, "Unseen sources").
    extra: dict[str, list[tuple[str, str]]] = {}
    for task, folders in LANGS.items():
        extra[task] = [(s, "mo:" + src) for s, src in mo_sentences(folders) if in_language(s, task)]
        sources[task] += " and program messages, " + ", ".join(
            f"/usr/share/locale/{f}/LC_MESSAGES/*.mo" for f in folders
        )
    extra["code"] = [(s, "dist-packages:" + src) for s, src in python_code(DIST_PACKAGES)]
    sources["code"] += f" and of {DIST_PACKAGES}"
    # Import statements, in neither of the above (a prompt `import numpy as np` went to the base model):
    # rows added after all others, so that every earlier row stays.
    trees = (("stdlib", PYLIB), ("dist-packages", DIST_PACKAGES))
    late = [
        {
            "code": [
                (s, f"{label}:{kind}/{src}")
                for kind, root in trees
                for s, src in python_code(root, nodes, min_chars=MIN_SHORT_CHARS, headers=headers)
            ]
        }
        for label, nodes, headers in (
            ("imports", (ast.Import, ast.ImportFrom), False),
            ("headers", _BLOCK_NODES, True),
        )
    ]
    sources["code"] += ", with their import statements and block headers"
    return first, added, extra, late, sources


def select(
    first: dict[str, list[tuple[str, str]]],
    added: dict[str, list[tuple[str, str]]],
    extra: dict[str, list[tuple[str, str]]],
    late: list[dict[str, list[tuple[str, str]]]],
    per_task: int,
    per_added_task: int,
    per_extra: int,
    per_late: int,
) -> tuple[list[dict], dict[str, int]]:
    """The selected rows ({"text", "task", "source"}) and each task's number of distinct usable texts.

    The first version's nine tasks keep exactly their rows (selected as before, deduplicated among
    themselves only); an added task's text, or a text of an added source, is dropped when it also
    occurs under another task or among the first version's rows of its own task."""
    owners: dict[str, set[str]] = defaultdict(set)
    for group in (first, added, extra):
        for task, items in group.items():
            for s, _ in items:
                owners[_key(s)].add(task)
    first_owners = {k: {t for t in ts if t in first} for k, ts in owners.items()}
    # the late group's texts are checked against every task, and do not change the earlier groups' rows
    late_owners = defaultdict(set, {k: set(ts) for k, ts in owners.items()})
    for group in late:
        for task, items in group.items():
            for s, _ in items:
                late_owners[_key(s)].add(task)
    rows, distinct, taken = [], Counter(), set()
    for group, limit, owner_of in (
        (first, per_task, first_owners),
        (added, per_added_task, owners),
        (extra, per_extra, owners),
        *((group, per_late, late_owners) for group in late),
    ):
        for task in sorted(group):
            source_of: dict[str, tuple[str, str]] = {}
            for s, src in group[task]:
                if _key(s) not in taken:
                    source_of.setdefault(_key(s), (s, src))
            unique = [v for k, v in source_of.items() if len(owner_of[k]) == 1]
            unique.sort(key=lambda v: hashlib.blake2b(v[0].encode(), digest_size=8).digest())
            distinct[task] += len(unique)
            for s, src in unique[:limit]:
                rows.append({"text": s, "task": task, "source": src})
                taken.add(_key(s))
    return rows, distinct


def collect(
    per_task: int, per_added_task: int, per_extra: int, per_late: int
) -> tuple[list[dict], dict[str, str]]:
    """The selected rows and a one-line source description per task."""
    first, added, extra, late, sources = raw_sources()
    rows, distinct = select(first, added, extra, late, per_task, per_added_task, per_extra, per_late)
    counts = Counter(r["task"] for r in rows)
    for task in sources:
        sources[task] += f": {distinct[task]} distinct texts, kept {counts[task]}"
    return rows, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--per-task", type=int, default=1450, help="sentences kept per task of the first nine (default 1450)"
    )
    parser.add_argument(
        "--per-added-task", type=int, default=500, help="texts kept per added task (default 500)"
    )
    parser.add_argument(
        "--per-extra",
        type=int,
        default=1500,
        help="texts kept per added source of a first task (default 1500)",
    )
    parser.add_argument(
        "--per-late",
        type=int,
        default=300,
        help="import statements, and block headers, kept for code (default 300 each)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not MAN.is_dir():
        print(f"error: {MAN} not found: this script reads the man pages of a Debian machine", file=sys.stderr)
        return 2
    rows, sources = collect(args.per_task, args.per_added_task, args.per_extra, args.per_late)
    # Order rows by hash, not by task, so that any prefix of the file holds every task.
    rows.sort(key=lambda r: hashlib.blake2b((r["task"] + "\t" + r["text"]).encode(), digest_size=8).digest())
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = Counter(r["task"] for r in rows)
    for task in sorted(sources):
        print(f"{task:11s} {counts[task]:5d}  {sources[task]}")
    print(f"{len(rows)} sentences, {args.out.stat().st_size / 1e6:.2f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
