"""Train tinylm and write model.json: a character 6-gram model of Python's own docstrings.

The corpus is the docstrings (``inspect.getdoc``) of a fixed list of pure-Python standard-library
modules and of their public classes, functions and methods, so training needs no download. Code
examples and indented blocks are dropped and each prose paragraph becomes one line of text.

Training is reproducible for a given Python version; docstrings change between releases, so
model.json records the version that produced it. Run from anywhere:

    python3 examples/tinylm/train.py [--output PATH]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# Pure-Python modules whose public names barely depend on the operating system (asyncio, os and
# shutil, for example, do), so that one Python version always yields the same corpus.
MODULES = """
argparse ast base64 bisect calendar cmd code codecs codeop collections concurrent.futures
configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest email enum
filecmp fileinput fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq
hmac html.parser http.client http.cookiejar http.server imaplib inspect ipaddress json logging
mailbox mimetypes netrc numbers operator optparse pathlib pickle plistlib pprint pstats queue
quopri random re sched secrets shlex smtplib statistics string tarfile tempfile textwrap
threading timeit tokenize trace traceback typing unittest urllib.parse urllib.request uuid
warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport
""".split()
ORDER = 6  # characters of context plus one: long enough for word fragments, small enough to ship
MIN_COUNT = 3  # continuations seen fewer times are dropped, which keeps model.json under 1 MB
OUTPUT = Path(__file__).with_name("model.json")


def module_docstrings(module: ModuleType) -> Iterator[str | None]:
    """The docstrings of a module and its public classes, functions and methods, in a fixed order."""
    yield inspect.getdoc(module)
    for name, obj in sorted(vars(module).items()):
        # Skip private names, constants and objects merely imported from other modules.
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _defined_in(obj, module):
            continue
        yield inspect.getdoc(obj)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and callable(member):
                    yield inspect.getdoc(member)


def _defined_in(obj: object, module: ModuleType) -> bool:
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module.__name__ or owner.startswith(module.__name__ + "."))


def prose_paragraphs(doc: str) -> Iterator[str]:
    """Paragraphs of running text, each flattened onto one line of printable ASCII."""
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        # Indented lines are code, tables or argument lists; they read badly as generated text.
        if any(line[:1].isspace() or line.startswith(">>>") for line in lines):
            continue
        text = " ".join("".join(ch for ch in paragraph if " " <= ch <= "~" or ch.isspace()).split())
        if len(text) >= 40:
            yield text


def build_corpus(module_names: list[str]) -> str:
    seen: set[str] = set()
    paragraphs: list[str] = []
    for module_name in module_names:
        for doc in module_docstrings(importlib.import_module(module_name)):
            # getdoc() falls back to inherited docstrings; count each text once.
            if doc and doc not in seen:
                seen.add(doc)
                paragraphs.extend(prose_paragraphs(doc))
    return "".join(p + "\n" for p in paragraphs)


def count_ngrams(text: str, order: int, min_count: int) -> list[dict[str, list[object]]]:
    """For each context length k < order, map each context to [next chars, counts], most common first."""
    tables: list[dict[str, list[object]]] = []
    for k in range(order):
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for i in range(k, len(text)):
            counts[text[i - k : i]][text[i]] += 1
        table: dict[str, list[object]] = {}
        for context in sorted(counts):
            # The empty context keeps every character so that any history has a distribution.
            kept = sorted((-n, ch) for ch, n in counts[context].items() if k == 0 or n >= min_count)
            if kept:
                table[context] = ["".join(ch for _, ch in kept), [-n for n, _ in kept]]
        tables.append(table)
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the model")
    args = parser.parse_args(argv)

    text = build_corpus(MODULES)
    model = {
        "name": "tinylm",
        "order": ORDER,
        "min_count": MIN_COUNT,
        "corpus": {
            "source": "docstrings of Python standard-library modules (see train.py)",
            "python": platform.python_version(),
            "modules": len(MODULES),
            "characters": len(text),
        },
        "vocab": "".join(sorted(set(text))),
        "tables": count_ngrams(text, ORDER, MIN_COUNT),
    }
    args.output.write_text(json.dumps(model, separators=(",", ":")) + "\n", encoding="utf-8")
    size_kb = args.output.stat().st_size / 1024
    print(f"trained on {len(text)} characters; wrote {args.output} ({size_kb:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
