"""A real labelled text corpus that installs offline: King James verses by their book's genre.

Every verse of the King James Bible (Debian ``bible-kjv``, public domain, read through
:func:`exitguard.data.text.kjv_verses`) is labelled with the genre of its book, following the
usual division of the Protestant canon into six groups:

=========  ==============================================================  ======
genre      books                                                           verses
=========  ==============================================================  ======
law        Genesis - Deuteronomy (the Pentateuch)                            5852
history    Joshua - Esther, and Acts                                         8025
poetry     Job, Psalms, Proverbs, Ecclesiastes, Song of Solomon              4785
prophets   Isaiah - Malachi (major and minor prophets), and Revelation       5894
gospels    Matthew, Mark, Luke, John                                         3779
epistles   Romans - Jude                                                     2767
=========  ==============================================================  ======

31,102 verses in all; the largest class (history) is 25.8% of them. The label is a property of
the book, given by the text's source, not by a model. Verses of one chapter are alike, so the
split into training and held-out data is by whole chapters (:func:`split_by_chapter`):
no held-out verse shares a chapter with a training verse.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

GENRES = ("law", "history", "poetry", "prophets", "gospels", "epistles")
"""The class names, in label order."""

_GENRE_BOOKS = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua",
        "Judges",
        "Ruth",
        "1 Samuel",
        "2 Samuel",
        "1 Kings",
        "2 Kings",
        "1 Chronicles",
        "2 Chronicles",
        "Ezra",
        "Nehemiah",
        "Esther",
        "Acts",
    ),
    "poetry": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah",
        "Jeremiah",
        "Lamentations",
        "Ezekiel",
        "Daniel",
        "Hosea",
        "Joel",
        "Amos",
        "Obadiah",
        "Jonah",
        "Micah",
        "Nahum",
        "Habakkuk",
        "Zephaniah",
        "Haggai",
        "Zechariah",
        "Malachi",
        "Revelation",
    ),
    "gospels": ("Matthew", "Mark", "Luke", "John"),
    "epistles": (
        "Romans",
        "1 Corinthians",
        "2 Corinthians",
        "Galatians",
        "Ephesians",
        "Philippians",
        "Colossians",
        "1 Thessalonians",
        "2 Thessalonians",
        "1 Timothy",
        "2 Timothy",
        "Titus",
        "Philemon",
        "Hebrews",
        "James",
        "1 Peter",
        "2 Peter",
        "1 John",
        "2 John",
        "3 John",
        "Jude",
    ),
}

BOOK_GENRE: dict[str, str] = {
    book: genre for genre, books in _GENRE_BOOKS.items() for book in books
}
"""The genre of each of the 66 books, by the book's name as the ``bible`` program prints it."""


@dataclasses.dataclass(frozen=True, repr=False)
class TextDataset:
    """Labelled short texts.

    Attributes
    ----------
    name : str
    texts : tuple of str, length n
    labels : int64 array of shape (n,)
        Index into ``class_names``.
    groups : int64 array of shape (n,)
        Group of each text (its chapter); splits keep groups whole.
    references : tuple of str, length n
        Where each text comes from (e.g. ``"John 11:35"``).
    class_names : tuple of str
    source : str
    """

    name: str
    texts: tuple[str, ...]
    labels: NDArray[np.int64]
    groups: NDArray[np.int64]
    references: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.labels.shape != (n,) or self.groups.shape != (n,) or len(self.references) != n:
            raise ValueError(
                f"`labels`, `groups` and `references` must have one entry per text ({n}); got "
                f"{self.labels.shape}, {self.groups.shape} and {len(self.references)}."
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"`labels` must lie in [0, {len(self.class_names) - 1}].")

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return (
            f"TextDataset({self.name!r}, n={len(self)}, classes={len(self.class_names)}, "
            f"largest class {self.largest_class_share():.1%})"
        )

    @property
    def fingerprint(self) -> str:
        """A hash of the texts and labels (for cache keys)."""
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode())
            digest.update(b"\0")
        digest.update(self.labels.astype("<i8").tobytes())
        return digest.hexdigest()[:16]

    def class_counts(self) -> NDArray[np.int64]:
        """Number of texts of each class, (C,)."""
        return np.bincount(self.labels, minlength=len(self.class_names)).astype(np.int64)

    def largest_class_share(self) -> float:
        """Accuracy of always predicting the most frequent class."""
        return float(self.class_counts().max() / max(len(self), 1))

    def subset(self, indices: Sequence[int] | NDArray[np.integer[Any]]) -> TextDataset:
        index = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            texts=tuple(self.texts[i] for i in index.tolist()),
            labels=self.labels[index],
            groups=self.groups[index],
            references=tuple(self.references[i] for i in index.tolist()),
        )

    def describe(self) -> dict[str, Any]:
        """Size, class names and class balance, as the report shows them."""
        counts = self.class_counts()
        return {
            "name": self.name,
            "source": self.source,
            "n": len(self),
            "classes": list(self.class_names),
            "class_counts": counts.tolist(),
            "largest_class_share": self.largest_class_share(),
        }


def label_verses(verses: Sequence[Any]) -> TextDataset:
    """Label parsed verses (:class:`exitguard.data.text.Verse`) with their book's genre."""
    unknown = sorted({v.book for v in verses} - set(BOOK_GENRE))
    if unknown:
        raise ValueError(f"verses of books without a genre: {unknown}; known: 66 KJV books.")
    chapters: dict[tuple[str, int], int] = {}
    groups = [chapters.setdefault((v.book, v.chapter), len(chapters)) for v in verses]
    return TextDataset(
        name="kjv-genres",
        texts=tuple(v.text for v in verses),
        labels=np.asarray([GENRES.index(BOOK_GENRE[v.book]) for v in verses], dtype=np.int64),
        groups=np.asarray(groups, dtype=np.int64),
        references=tuple(v.reference for v in verses),
        class_names=GENRES,
        source="King James Bible, Debian package bible-kjv; label = genre of the verse's book",
    )


def kjv_genres() -> TextDataset:
    """All 31,102 King James verses labelled by genre (needs Debian ``bible-kjv``).

    Raises
    ------
    FileNotFoundError
        When the ``bible`` program is missing (run ``scripts/install-text.sh``).
    """
    from exitguard.data.text import kjv_verses

    try:
        verses = kjv_verses()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            "the text task's corpus needs the Debian package `bible-kjv`: run "
            "scripts/install-text.sh (or `apt-get install -y bible-kjv`)."
        ) from error
    return label_verses(verses)


def split_by_chapter(
    data: TextDataset, *, heldout_fraction: float, seed: int
) -> tuple[TextDataset, TextDataset]:
    """(training, held-out) with whole chapters on each side, drawn at random by ``seed``.

    Chapters are assigned to the held-out side in a random order until it holds at least
    ``heldout_fraction`` of the texts.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"`heldout_fraction` must lie in (0, 1); got {heldout_fraction!r}.")
    groups, sizes = np.unique(data.groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(groups))
    filled = np.cumsum(sizes[order])  # (G,) held-out size after each chapter
    n_groups = int(np.searchsorted(filled, heldout_fraction * len(data))) + 1
    heldout_groups = groups[order[:n_groups]]
    held = np.isin(data.groups, heldout_groups)
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))


def sample(data: TextDataset, n: int | None, *, seed: int) -> TextDataset:
    """``n`` texts drawn at random without replacement, in their original order (all for None)."""
    if n is None:
        return data
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(data):
        raise ValueError(f"`n` must be an integer in [1, {len(data)}] or None; got {n!r}.")
    rng = np.random.default_rng(seed)
    return data.subset(np.sort(rng.choice(len(data), size=n, replace=False)))
