"""``fedllm report RUN_DIR``: turn a run's summary.json into ``RUN_DIR/report/``.

Writes ``index.html`` (self-contained, offline), ``report.md`` and the PNG pictures
they show. Every file is written to a temporary name and renamed into place, so a
reader (a Kubeflow UI, a browser refreshing) never sees half a report.
"""

from __future__ import annotations

from pathlib import Path

from fedllm.files import write_atomic
from fedllm.report.communication import communication_section
from fedllm.report.curves import curves_section
from fedllm.report.document import Document
from fedllm.report.header import header_section, run_title
from fedllm.report.html import render_html
from fedllm.report.markdown import render_markdown
from fedllm.report.partition import partition_section
from fedllm.report.results import results_section
from fedllm.report.run_summary import load_summary
from fedllm.report.significance import significance_section
from fedllm.report.task import task_curves_section
from fedllm.report.timing import timing_section
from fedllm.rundir import REPORT

REPORT_DIR = REPORT


def build_document(run_dir: str | Path) -> Document:
    """The report of ``run_dir`` as blocks, in reading order; raises ``FedllmError`` on a bad summary."""
    summary, summary_path = load_summary(run_dir)
    source = str(summary_path)
    return Document(
        run_title(summary),
        [
            header_section(summary, source),
            results_section(summary, source),
            significance_section(summary, source),
            task_curves_section(summary, source),
            curves_section(summary, source),
            partition_section(summary, Path(run_dir), source),
            communication_section(summary, source),
            timing_section(summary, source),
        ],
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/{index.html, report.md, *.png}`` and return the path of index.html.

    Raises ``FedllmError`` naming the path when ``run_dir`` has no summary.json or it
    is malformed. Missing optional fields give a section that says "not recorded".
    """
    document = build_document(run_dir)
    out = Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for picture in document.pictures():
        write_atomic(out / picture.file_name, picture.png)
    write_atomic(out / "report.md", render_markdown(document).encode("utf-8"))
    index = out / "index.html"
    write_atomic(index, render_html(document).encode("utf-8"))
    return index

