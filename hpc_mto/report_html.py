"""report.html: one self-contained file (inline CSS, images as data URIs) that can be mailed or
copied off the cluster on its own: it references no other file and nothing on the network."""

from __future__ import annotations

import base64
from html import escape

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.num { text-align: right; }
th { background: #eee; }
p.note { color: #666; font-size: 0.9em; margin-top: 0; }
p.status { font-weight: bold; }
figure { display: inline-block; margin: 1em 1em 1em 0; }
"""


def table(t) -> str:
    cls = [' class="num"' if n else "" for n in t.numeric()]
    head = "".join(f"<th{c}>{escape(h)}</th>" for h, c in zip(t.header, cls))
    body = "".join("<tr>" + "".join(f"<td{c}>{escape(x)}</td>" for x, c in zip(row, cls)) + "</tr>"
                   for row in t.rows)
    note = f'<p class="note">{escape(t.note)}</p>' if t.note else ""
    return f"<h2>{escape(t.title)}</h2>\n<table><tr>{head}</tr>{body}</table>{note}\n"


def image(name: str, data: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{uri}" alt="{escape(name)}"><figcaption>{escape(name)}</figcaption></figure>\n'


def render(title: str, status: str, tables, images: dict[str, bytes]) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{escape(title)}</h1>\n<p class=\"status\">{escape(status)}</p>\n"
            + "".join(map(table, tables)) + "<h2>plots</h2>\n" + "".join(image(n, d) for n, d in images.items())
            + "</body></html>\n")
