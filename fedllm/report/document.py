"""The report as plain data: sections of paragraphs, tables and pictures.

Each section module builds these blocks once; ``html.py`` and ``markdown.py`` render
the same blocks, so the HTML page and ``report.md`` cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class Cell:
    """One table cell. ``detail`` (e.g. ``± 0.012``) is shown smaller in HTML only;
    ``best`` marks the best value of its column (bold in both formats)."""

    text: str
    detail: str = ""
    best: bool = False
    numeric: bool = False


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Picture:
    """A PNG written beside the report as ``file_name``; ``png`` holds its bytes for embedding."""

    file_name: str
    caption: str
    png: bytes


@dataclass
class Paragraph:
    text: str
    note: bool = False  # a caveat the reader must not miss (shown as a call-out)


@dataclass
class Facts:
    """Short ``label: value`` lines (run name, method, model) shown as a list."""

    items: list[tuple[str, str]]


Block = Union[Paragraph, Facts, Table, Picture]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    sections: list[Section]

    def pictures(self) -> list[Picture]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Picture)]


def not_recorded(what: str) -> Paragraph:
    """The paragraph a section shows when the run did not record its data."""
    return Paragraph(f"{what}: not recorded in this run.")
