"""The report as Markdown (``report.md``): the same blocks as the HTML page, pictures by file name."""

from __future__ import annotations

from fedllm.report.document import Cell, Document, Facts, Paragraph, Picture, Table


def render_markdown(document: Document) -> str:
    lines = [f"# {document.title}", ""]
    for section in document.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                lines += [f"> **Note:** {block.text}" if block.note else block.text, ""]
            elif isinstance(block, Facts):
                lines += [*(f"- **{k}:** {v}" for k, v in block.items), ""]
            elif isinstance(block, Table):
                lines += [*_table(block), ""]
            elif isinstance(block, Picture):
                lines += [f"![{block.file_name}]({block.file_name})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def _table(table: Table) -> list[str]:
    # A column is right-aligned when its cells are numbers (taken from the first row).
    numeric = [cell.numeric for cell in table.rows[0]] if table.rows else [False] * len(table.columns)
    rule = ["---:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(_escape(c) for c in table.columns) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return lines


def _cell(cell: Cell) -> str:
    text = _escape(cell.text)
    return f"**{text}**" if cell.best else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
