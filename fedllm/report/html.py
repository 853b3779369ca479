"""The report as one offline HTML page.

No scripts, no external stylesheets, fonts or images: the CSS is inline and every
picture is embedded as a ``data:`` URI, so ``index.html`` alone can be mailed, attached
to a pipeline run or opened on a machine without network. Each picture also links its
PNG file beside the page by relative name.
"""

from __future__ import annotations

import base64
from html import escape

from fedllm.report.document import Cell, Document, Facts, Paragraph, Picture, Table

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 60rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.5rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
ul.facts { list-style: none; padding-left: 0; }
p.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5rem 0.8rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
caption { caption-side: bottom; text-align: left; font-size: 0.82rem; color: #555; padding-top: 0.3rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.55rem; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.best { background: #e8f4e8; }
td small { color: #777; font-size: 0.75em; margin-left: 0.25em; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
"""


def render_html(document: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(document.title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(document.title)}</h1>",
    ]
    for section in document.sections:
        parts.append(f"<section><h2>{escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                opening = '<p class="note">' if block.note else "<p>"
                parts.append(f"{opening}{escape(block.text)}</p>")
            elif isinstance(block, Facts):
                items = "".join(f"<li><b>{escape(k)}:</b> {escape(v)}</li>" for k, v in block.items)
                parts.append(f'<ul class="facts">{items}</ul>')
            elif isinstance(block, Table):
                parts.append(_table(block))
            elif isinstance(block, Picture):
                parts.append(_picture(block))
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _table(table: Table) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _cell(cell: Cell) -> str:
    classes = " ".join(c for c, on in (("num", cell.numeric), ("best", cell.best)) if on)
    text = f"<strong>{escape(cell.text)}</strong>" if cell.best else escape(cell.text)
    detail = f"<small>{escape(cell.detail)}</small>" if cell.detail else ""
    return f'<td class="{classes}">{text}{detail}</td>' if classes else f"<td>{text}{detail}</td>"


def _picture(picture: Picture) -> str:
    data = base64.b64encode(picture.png).decode("ascii")
    name = escape(picture.file_name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(picture.caption)}">'
        f'<figcaption>{escape(picture.caption)} (<a href="{name}">{name}</a>)</figcaption></figure>'
    )
