"""Drawing helpers shared by the report's charts.

Figures are made with the object API and rendered by the Agg canvas directly, so the
report never touches pyplot's global state or the process-wide backend (it can run
inside a notebook or a training process without side effects).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float = 7.5, height: float = 4.2) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp in the metadata, so reruns give the same file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def byte_unit(largest: float) -> tuple[str, float]:
    """The unit (B, KB, MB, GB; powers of 1000) that shows ``largest`` bytes in a readable range."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if largest >= size:
            return unit, size
    return "B", 1.0


def human_bytes(n: float) -> str:
    unit, size = byte_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / size:.1f} {unit}"
