"""Build the man-page section classification data set (bench/data/manpages_{train,test}.jsonl).

Material: the English manual pages that come with the OS image (``/usr/share/man/man{1,2,3,5,7,8}``).
One example per page: the first ``--words`` words of its DESCRIPTION section, roff markup stripped,
labelled with the page's section:

    1 commands (user commands)   2 syscalls (system calls)   3 library (library functions)
    5 formats (file formats)     7 overview (conventions, protocols, overviews)   8 admin (system administration)

Sections 4 (devices, 38 pages) and 6 (games, 1 page) are too small to learn and are left out. The text
after the page's NAME line is used, not the NAME line itself, so the command / function name does not
give the section away by itself. Pages that only include another page (``.so``) and exact duplicates
are skipped. The image carries 16,631 ``gcloud-*`` pages in man1, so at most ``--per-family`` (4) pages of
one family (the page name up to its first ``-``, ``_``, ``.`` or ``:``) are kept, picked at random with
the seed: the task is about sections, not about gcloud.

Per section at most ``--per-section`` pages are sampled (seeded), then split per section into train and
test (``--test-fraction``), so both splits have the same class balance. Deterministic for one OS image:

    python bench/data/build_manpages.py            # writes bench/data/manpages_{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path

SECTIONS = {"1": "commands", "2": "syscalls", "3": "library", "5": "formats", "7": "overview", "8": "admin"}

# Font and phrase macros whose arguments are running text (man and mdoc); every other request line
# (.PP, .TP, .RS, .nf, .if, .de, comments, ...) carries no prose and is dropped.
_TEXT_MACROS = {
    "B",
    "I",
    "BR",
    "RB",
    "IR",
    "RI",
    "BI",
    "IB",
    "SM",
    "SB",
    "UR",
    "MT",
    "Nm",
    "Ar",
    "Fl",
    "Cm",
    "Pa",
    "Xr",
    "Va",
    "Fn",
    "Fa",
    "Dv",
    "Ql",
    "Sy",
    "Em",
    "Li",
    "Ev",
    "Er",
    "Dq",
    "Pq",
    "Sq",
    "Qq",
    "Op",
    "Ic",
    "Ft",
    "Vt",
    "Lk",
    "Tn",
    "Ux",
    "Bx",
    "At",
    "Nx",
    "Fx",
    "Ox",
    "Dl",
}
# mdoc call-able macro names that can appear inside the arguments of another mdoc macro
_MDOC_WORDS = {m for m in _TEXT_MACROS if len(m) == 2 and m[0].isupper() and m[1].islower()} | {
    "Ns",
    "No",
    "Pf",
}

_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\*\((lq|rq)"), '"'),
    (re.compile(r"\\\*\[[^\]]*\]|\\\*\(..|\\\*."), ""),  # other strings
    (re.compile(r"\\\[[^\]]*\]|\\\(.."), ""),  # other special characters
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[&c%|^/,:)]"), ""),  # zero-width escapes
    (re.compile(r"\\e"), "\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\."), ""),  # anything left
]


def _strip_escapes(text: str) -> str:
    for pattern, repl in _ESCAPES:
        text = pattern.sub(lambda _m, r=repl: r, text)  # a function: the replacement is literal
    return text


def _macro_args(rest: str) -> str:
    """The arguments of a text macro, quotes removed (``.BR "a b" c`` -> ``a b c``)."""
    args = re.findall(r'"([^"]*)"|(\S+)', rest)
    words = [a or b for a, b in args]
    return " ".join(w for w in words if w not in _MDOC_WORDS)


def description(source: str) -> str | None:
    """The DESCRIPTION section of a man/mdoc page as plain text (None when the page has none)."""
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        head = re.match(r'^[.\']\s*(SH|Sh)\s+"?([^"]*)"?\s*$', line)
        if head:
            if inside:
                break
            inside = head.group(2).strip().upper() == "DESCRIPTION"
            continue
        if not inside:
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
            if m and m.group(1) in _TEXT_MACROS:
                out.append(_macro_args(m.group(2)))
            continue
        out.append(line)
    text = " ".join(_strip_escapes(part) for part in out)
    text = re.sub(r"\s+", " ", text).strip()
    return text or None


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _family(page: str) -> str:
    return re.split(r"[-_.:]", page, maxsplit=1)[0].lower() or page


def collect(man_root: Path, section: str, words: int, per_family: int, rng: random.Random) -> list[str]:
    """Texts of one section: one per page, at most ``per_family`` per page family, deduplicated."""
    folder = man_root / f"man{section}"
    if not folder.is_dir():
        raise FileNotFoundError(f"no man section folder {folder}")
    by_family: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink():
            by_family[_family(path.name)].append(path)
    texts, seen = [], set()
    for family in sorted(by_family):
        pages = by_family[family]
        rng.shuffle(pages)
        kept = 0
        for path in pages:
            if kept >= per_family:
                break
            source = _read(path)
            if re.match(r"^\.so\s", source.lstrip()):
                continue  # an alias of another page
            text = description(source)
            if text is None:
                continue
            cut = text.split(" ")[:words]
            if len(cut) < 8:
                continue
            text = " ".join(cut)
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            kept += 1
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--man-root", default="/usr/share/man")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--per-section", type=int, default=300)
    parser.add_argument("--per-family", type=int, default=4)
    parser.add_argument("--words", type=int, default=40, help="words kept from the start of DESCRIPTION")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    train, test = [], []
    for section, label in SECTIONS.items():
        texts = collect(Path(args.man_root), section, args.words, args.per_family, rng)
        rng.shuffle(texts)
        texts = texts[: args.per_section]
        n_test = round(len(texts) * args.test_fraction)
        test += [{"text": t, "label": label} for t in texts[:n_test]]
        train += [{"text": t, "label": label} for t in texts[n_test:]]
        print(f"man{section} ({label}): {len(texts)} pages, {len(texts) - n_test} train / {n_test} test")
    rng.shuffle(train)
    rng.shuffle(test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("manpages_train.jsonl", train), ("manpages_test.jsonl", test)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {out / name}: {len(rows)} examples, {(out / name).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
