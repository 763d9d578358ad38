"""report.md: the report's sections (or any document laid out as sections) as Markdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.report.blocks import Section
from quantkit.report.format import _md_cell
from quantkit.report.sections import report_sections


def render_markdown(report: Mapping[str, Any]) -> str:
    return sections_markdown(report_sections(report))


def sections_markdown(sections: Sequence[Section]) -> str:
    """Markdown of any document laid out as sections (the report, `compare-recipes`' comparison)."""
    out = []
    for n, s in enumerate(sections):
        out.append(("# " if n == 0 else "## ") + _md_cell(s.title))
        out.extend(b.markdown() for b in s.blocks)
    return "\n\n".join(out) + "\n"
