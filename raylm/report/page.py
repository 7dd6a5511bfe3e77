"""One self-contained HTML page: inline CSS, plots as data: URIs, no script, no network font.

raylm report runs/quickstart          # writes runs/quickstart/report.html
"""

from __future__ import annotations

import base64
import html
import time

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; margin: 0.5rem 0; } code { background: #f4f4f4; padding: 0 0.2rem; }
.muted { color: #777; font-size: 0.85rem; }
"""


def escape(value) -> str:
    return html.escape(str(value))


def number(value) -> str:
    """A value as text (not escaped: `table` escapes what it puts in a cell)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>nothing recorded</p>"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{escape(number(row.get(c)))}</td>"
            if isinstance(row.get(c), int | float) and not isinstance(row.get(c), bool)
            else f"<td>{row.get(c) if isinstance(row.get(c), Raw) else escape('-' if row.get(c) is None else row.get(c))}</td>"
            for c in columns
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts(pairs: dict) -> str:
    """A two-column table of labelled values."""
    return table([{"": k, "value": v} for k, v in pairs.items() if v is not None], ["", "value"])


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{escape(alt)}'>"


class Raw(str):
    """Markup already built (a link), put into a table cell as it is."""


def link(href: str, text: str) -> Raw:
    return Raw(f"<a href='{escape(href)}'>{escape(text)}</a>")


def document(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    parts = [
        f"<h1>{escape(title)}</h1>",
        f"<p class='muted'>{escape(subtitle)} · report written {time.strftime('%Y-%m-%d %H:%M')}</p>",
    ]
    parts += [f"<h2>{escape(heading)}</h2>\n{body}" for heading, body in sections]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
