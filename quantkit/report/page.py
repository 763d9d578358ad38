"""report.html: the report's sections (or any document laid out as sections) as one self-contained
page: inline CSS, plots as data: URIs, no script, nothing fetched.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.report.blocks import Section
from quantkit.report.format import _text
from quantkit.report.sections import _recipe_name, report_sections


_CSS = """
:root { --fg:#1d232b; --muted:#6b7480; --line:#dde2e8; --bg:#f6f8fa; --pass:#1a7f37; --fail:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:#fff; }
main { max-width:1160px; margin:0 auto; padding:24px 20px 48px; }
h1 { font-size:24px; margin:0 0 14px; }
h2 { font-size:18px; margin:34px 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
nav { font-size:13px; margin:0 0 16px; color:var(--muted); }
nav a { color:#0a5bb5; text-decoration:none; margin-right:14px; }
p { margin:8px 0; } p.muted { color:var(--muted); font-style:italic; }
p.warn, ul.warn { color:#8a4b00; background:#fff8e6; border-left:4px solid #e7a600; padding:8px 12px 8px 28px; }
p.warn { padding-left:12px; }
.banner { border-radius:6px; padding:10px 16px; margin:0 0 14px; color:#fff; }
.banner strong { font-size:18px; letter-spacing:.04em; }
.banner ul { margin:6px 0 0; padding-left:20px; }
.banner.pass { background:var(--pass); } .banner.fail { background:var(--fail); }
.banner.unknown { background:#6b7480; }
.scroll { overflow-x:auto; margin:8px 0; }
table { border-collapse:collapse; font-size:13px; }
th, td { padding:4px 7px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
thead th { background:var(--bg); border-bottom:2px solid var(--line); white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.wide { min-width:12em; }
tbody tr:nth-child(even) { background:#fbfcfd; }
tr.fail td { color:var(--fail); } tr.pass td:last-child { color:var(--pass); font-weight:600; }
tr.muted td { color:var(--muted); font-style:italic; }
tr.total td { font-weight:600; border-top:2px solid var(--line); }
tr:target td { background:#fff3b0; }
figure.plot { margin:12px 0; overflow-x:auto; }
figure.plot img { display:block; max-width:none; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
details summary { cursor:pointer; color:#0a5bb5; margin:8px 0; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: inline CSS, plots as data: URIs, no script, nothing fetched."""
    return sections_html(
        report_sections(report),
        f"quantkit report: {_recipe_name(report)}",
        f"Rendered from report.json ({_text(report.get('schema'))}) by quantkit.report.",
    )


def sections_html(sections: Sequence[Section], title: str, footer: str) -> str:
    """A self-contained page of any document laid out as sections (see render_html)."""
    body = []
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections[1:] if s.anchor)
    for n, s in enumerate(sections):
        tag = "h1" if n == 0 else "h2"
        body.append(f'<section id="{s.anchor}"><{tag}>{html.escape(s.title)}</{tag}>')
        if n == 0:
            body.append(f"<nav>{nav}</nav>")
        body.extend(b.html() for b in s.blocks)
        body.append("</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><main>{''.join(body)}<footer>{html.escape(footer)}</footer></main>"
        "</body></html>\n"
    )
