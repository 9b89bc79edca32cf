"""Text the encoder reads: one line per catalogue item, one line per user history.

The catalogue is public, so item text may be shown and logged freely; a history
text is private to its user and stays where that user's data lives.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for annotations only: common.data imports this module
    from common.data import Catalogue

ITEM_SEP = " | "


def render_item(fields: Mapping[str, str], columns: Sequence[str], template: str | None = None) -> str:
    """Render one item's text from its (already stringified) fields.

    Without a template the non-empty values of `columns` are joined with " | ",
    so an item without genres reads "Title (Year)" rather than "Title (Year) | ".

    >>> render_item({"title": "Toy Story (1995)", "genres": "Animation, Comedy"}, ["title", "genres"])
    'Toy Story (1995) | Animation, Comedy'
    >>> render_item({"title": "Heat (1995)", "genres": ""}, ["title", "genres"], "{title} [{genres}]")
    'Heat (1995) []'
    """
    if template is not None:
        return template.format_map(fields)
    return ITEM_SEP.join(fields[c] for c in columns if fields[c])


def template_fields(template: str) -> list[str]:
    """The field names a `str.format` template refers to, in order.

    >>> template_fields("{title} | {genres}")
    ['title', 'genres']
    """
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def history_text(catalogue: Catalogue, items: Sequence[int], max_items: int = 20, sep: str = "; ") -> str:
    """A user's history as text, most recent item FIRST.

    `items` is chronological (oldest first), as in `Interactions.sequences`.
    Putting the newest item first means a tokenizer that truncates from the
    right drops the oldest items, which matter least for the next one.

    >>> from common.data import Catalogue
    >>> cat = Catalogue(("a", "b", "c"), ("A (1990)", "B (1991)", "C (1992)"), ((), (), ()))
    >>> history_text(cat, [0, 1, 2], max_items=2)
    'C (1992); B (1991)'
    """
    if max_items <= 0:
        return ""
    recent = list(items)[-max_items:]
    return sep.join(catalogue.texts[int(i)] for i in reversed(recent))
