"""The record every loader produces and every later step consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Example:
    """One instruction-following example.

    ``instruction`` and ``input`` (context, may be empty) form the prompt through a
    template; ``output`` is the answer the loss is computed on. ``label`` is the
    category a Dirichlet partition splits over (Dolly's category, PhraseBank's
    sentiment); ``source`` the data source it came from; ``origin`` where in the
    file it was read (``path:line``), so errors downstream can point back at it.
    """

    instruction: str
    output: str
    input: str = ""
    label: Optional[str] = None
    source: str = ""
    origin: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**d)
