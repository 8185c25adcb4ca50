"""HTML building blocks for the web pages: escaping, the page frame, tables, numbers.

Every piece of user text (model names, card fields, stored errors, settings) reaches
a page through ``esc``; helpers that take ready-made HTML say so (``*_html``). Pages
are plain server-rendered HTML so they work without JavaScript and in any browser.
"""

from __future__ import annotations

import html
from urllib.parse import quote, urlencode

from fastapi.responses import HTMLResponse

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem;
color:#1b1b1b;background:#fff}
nav a{margin-right:1rem}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.92rem}
th,td{border-bottom:1px solid #ddd;padding:0.3rem 0.6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;color:#555;padding:0.3rem 0}
.flag{color:#a40000}
.ok{color:#116611}
.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;padding:0.5rem}
figure svg{max-width:100%;height:auto}
progress{width:20rem}
.muted{color:#666}
.scroll{overflow-x:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:0.2rem 1rem}
dt{font-weight:600}
dd{margin:0}
"""

DASH = "\u2014"


def esc(value) -> str:
    """``value`` as text safe in element content and in quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return DASH
    return f"{100 * low:.1f}\u2013{100 * high:.1f}%"


def number(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def link(href: str, text) -> str:
    """A link to one of our own pages; ``href`` is built by us, ``text`` is user text."""
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def model_href(model_id: str) -> str:
    return "/models/" + quote(str(model_id), safe="")


def query(**params) -> str:
    return "?" + urlencode({k: v for k, v in params.items() if v is not None})


NAV = (
    '<nav><a href="/">Leaderboard</a><a href="/boards/calibration">Calibration</a>'
    '<a href="/boards/corruption">Corruption</a><a href="/boards/transfer">Transfer</a>'
    '<a href="/boards/backdoor">Backdoor</a><a href="/boards/privacy">Privacy</a></nav>'
)


def page(title: str, body_html: str, *, status: int = 200, refresh: int | None = None):
    """A whole page; ``refresh`` reloads it every that many seconds (a running job)."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
        f"<title>{esc(title)} \u00b7 gauntlet</title>"
        '<link rel="stylesheet" href="/static/gauntlet.css"></head>'
        f"<body>{NAV}<h1>{esc(title)}</h1>{body_html}</body></html>"
    )
    return HTMLResponse(text, status_code=status)


def error_page(status: int, message: str):
    titles = {400: "Bad request", 404: "Not found"}
    return page(titles.get(status, "Error"), f"<p>{esc(message)}</p>", status=status)


def table(headers_html: list[str], rows_html: list[list[str]], *, numeric=(), **attrs) -> str:
    """A table of ready-made HTML cells; columns whose index is in ``numeric`` align right.

    ``attrs`` become the table's attributes (``id``, ``aria_label``); a ``caption``
    keyword is user-safe text shown above it.
    """
    caption = attrs.pop("caption", None)
    attributes = "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    # Wrapped so a wide table scrolls on its own instead of widening the page.
    parts = [f'<div class="scroll"><table{attributes}>']
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    heads = "".join(
        f'<th scope="col"{" class=num" if i in numeric else ""}>{h}</th>'
        for i, h in enumerate(headers_html)
    )
    parts.append(f"<thead><tr>{heads}</tr></thead><tbody>")
    for row in rows_html:
        cells = "".join(
            f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row)
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def definition_list(items: list[tuple[str, str]]) -> str:
    """Label and ready-made HTML value pairs."""
    rows = "".join(f"<dt>{esc(label)}</dt><dd>{value}</dd>" for label, value in items)
    return f"<dl>{rows}</dl>"


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"
