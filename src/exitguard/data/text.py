"""Real text corpora, all offline: the King James Bible, Python's help topics and docs.

- King James Bible: Debian ``bible-kjv`` (public domain text), read through its ``bible``
  program (its data file uses a custom compression). ``apt-get install -y bible-kjv``.
- Python help topics: CPython's own ``pydoc_data.topics`` (always present; used in tests).
- Python documentation sources: Debian ``python3.11-doc`` (reST files), when installed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

KJV_RANGE = "gen1:1-rev22:21"
KJV_OLD_TESTAMENT = "gen1:1-mal4:6"
KJV_NEW_TESTAMENT = "matt1:1-rev22:21"
PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")

_CHAPTER = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")


@dataclasses.dataclass(frozen=True)
class Verse:
    """One verse: ``book chapter:verse`` and its text on one line."""

    book: str
    chapter: int
    verse: int
    text: str

    @property
    def reference(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def _bible_program() -> str:
    program = shutil.which("bible")
    if program is None:
        raise FileNotFoundError(
            "the King James Bible needs the Debian package `bible-kjv`: "
            "run `apt-get install -y bible-kjv` (or scripts/install-lm.sh)."
        )
    return program


def parse_kjv(raw: str) -> list[Verse]:
    """Parse the ``bible`` program's output (chapter headers, indented numbered verses)."""
    verses: list[Verse] = []
    book, chapter = "", 0
    current: list[str] | None = None
    number = 0

    def flush() -> None:
        if current is not None:
            verses.append(Verse(book, chapter, number, " ".join(current).strip()))

    for line in raw.splitlines():
        if not line.strip():
            continue
        verse = _VERSE.match(line)
        if verse:
            flush()
            number, current = int(verse["verse"]), [verse["text"].strip()]
            continue
        header = _CHAPTER.match(line)
        if header and not line.startswith(" "):
            if current is not None and line[0].islower():
                current.append(line.strip())  # a continuation line that looks like a header
                continue
            flush()
            book, chapter, current = header["book"], int(header["chapter"]), None
            continue
        if current is not None:
            current.append(line.strip())  # continuation of a wrapped verse
    flush()
    return verses


def kjv_verses(span: str = KJV_RANGE) -> list[Verse]:
    """The King James Bible's verses (31,102 for the whole text), in order.

    Parameters
    ----------
    span : str
        A ``bible`` program range, e.g. ``"gen1:1-rev22:21"`` (all) or ``"john1:1-john3:36"``.
    """
    result = subprocess.run(
        [_bible_program(), span], capture_output=True, text=True, check=True, timeout=60
    )
    return parse_kjv(result.stdout)


def kjv_text(span: str = KJV_RANGE) -> str:
    """The King James Bible as plain text, one verse per line."""
    return "\n".join(verse.text for verse in kjv_verses(span))


def pydoc_topics_text() -> str:
    """CPython's help topics (``pydoc_data.topics``), about 465k characters; always present."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def python_docs_text(*, root: Path = PYTHON_DOC_SOURCES, limit: int | None = None) -> str:
    """The Python documentation's reST sources (Debian ``python3.11-doc``), concatenated."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is missing: run `apt-get install -y python3.11-doc`, or use the help "
            "topics (`pydoc`) instead."
        )
    files = sorted(root.rglob("*.txt"))[:limit]
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


CORPORA = ("kjv", "kjv-ot", "kjv-nt", "pydoc", "python-docs")
_KJV_SPANS = {"kjv": KJV_RANGE, "kjv-ot": KJV_OLD_TESTAMENT, "kjv-nt": KJV_NEW_TESTAMENT}


def corpus_text(name: str) -> str:
    """One of :data:`CORPORA` as a single string.

    ``kjv-ot`` and ``kjv-nt`` are the Old and New Testaments: train exit heads on one and
    draw calibration prompts from the other.
    """
    if name in _KJV_SPANS:
        return kjv_text(_KJV_SPANS[name])
    if name == "pydoc":
        return pydoc_topics_text()
    if name == "python-docs":
        return python_docs_text()
    raise ValueError(f"`corpus` must be one of {CORPORA}; got {name!r}.")


def text_passages(name: str) -> list[str]:
    """A corpus cut into consecutive passages: verses (kjv) or paragraphs (pydoc, python-docs)."""
    if name in _KJV_SPANS:
        return [verse.text for verse in kjv_verses(_KJV_SPANS[name])]
    text = corpus_text(name)
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", text)]
    return [paragraph for paragraph in paragraphs if len(paragraph) >= 40]
