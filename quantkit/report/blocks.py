"""The pieces a report is laid out in: paragraphs, lists, banners, tables, plots and sections, each
rendering itself to Markdown and to HTML.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantkit.report.format import NOT_MEASURED, _md_cell
from quantkit.report.plots import _CSS_DPI, figure_png


@dataclass
class Paragraph:
    text: str
    kind: str = "text"  # text | muted | warn

    def markdown(self) -> str:
        text = _md_cell(self.text)
        return f"_{text}_" if self.kind == "muted" else text

    def html(self) -> str:
        return f'<p class="{self.kind}">{html.escape(self.text)}</p>'


@dataclass
class BulletList:
    items: list[str]
    kind: str = "text"

    def markdown(self) -> str:
        return "\n".join(f"- {_md_cell(i)}" for i in self.items)

    def html(self) -> str:
        lis = "".join(f"<li>{html.escape(i)}</li>" for i in self.items)
        return f'<ul class="{self.kind}">{lis}</ul>'


@dataclass
class Banner:
    """The verdict: passed True/False, or None when the report was not judged."""

    passed: bool | None
    details: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {True: "PASSED", False: "FAILED", None: "NOT JUDGED"}[self.passed]

    def markdown(self) -> str:
        lines = [f"**{self.label}**"]
        lines += [f"- {_md_cell(d)}" for d in self.details]
        return "\n".join(lines)

    def html(self) -> str:
        cls = {True: "pass", False: "fail", None: "unknown"}[self.passed]
        items = "".join(f"<li>{html.escape(d)}</li>" for d in self.details)
        return (
            f'<div class="banner {cls}"><strong>{self.label}</strong>'
            + (f"<ul>{items}</ul>" if items else "")
            + "</div>"
        )


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices
    wide: set[int] = field(default_factory=set)  # HTML: columns given a minimum width (long text)
    row_ids: list[str] | None = None  # HTML anchors, one per row
    row_classes: list[str] | None = None
    collapse_after: int | None = None  # HTML: fold into <details> beyond this many rows

    def markdown(self) -> str:
        head = "| " + " | ".join(_md_cell(c) for c in self.columns) + " |"
        rule = "|" + "|".join("---:" if i in self.numeric else "---" for i in range(len(self.columns))) + "|"
        body = ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join([head, rule, *body])

    def html(self) -> str:
        def cell(tag: str, i: int, text: str) -> str:
            classes = " ".join(c for c, cols in (("num", self.numeric), ("wide", self.wide)) if i in cols)
            cls = f' class="{classes}"' if classes else ""
            return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", i, c) for i, c in enumerate(self.columns))
        body = []
        for n, row in enumerate(self.rows):
            attrs = ""
            if self.row_ids:
                attrs += f' id="{html.escape(self.row_ids[n])}"'
            if self.row_classes and self.row_classes[n]:
                attrs += f' class="{html.escape(self.row_classes[n])}"'
            body.append(f"<tr{attrs}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
        table = f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
        if self.collapse_after is not None and len(self.rows) > self.collapse_after:
            return f"<details><summary>Show all {len(self.rows)} rows</summary>{table}</details>"
        return table


@dataclass
class Plot:
    """A figure made on demand by `build`; `hover` gives a tooltip per x index (per-layer plot)."""

    key: str
    caption: str
    build: Callable[[], Any]
    hover: list[tuple[str, str]] | None = None  # (anchor id, tooltip) per x index
    page: str = "report.html"  # where Markdown readers find the rendered plot

    def markdown(self) -> str:
        return f"_Plot ({self.caption}): see {self.page}._"

    def html(self) -> str:
        fig = self.build()
        if fig is None:
            return Paragraph(f"{self.caption}: {NOT_MEASURED}.", "muted").html()
        width, height = (round(v * _CSS_DPI) for v in fig.get_size_inches())
        png = base64.b64encode(figure_png(fig)).decode("ascii")
        usemap = f' usemap="#map-{self.key}"' if self.hover else ""
        img = (
            f'<img src="data:image/png;base64,{png}" width="{width}" height="{height}"'
            f' alt="{html.escape(self.caption)}"{usemap}>'
        )
        area_map = self._image_map(fig, width, height) if self.hover else ""
        return f'<figure class="plot">{img}{area_map}<figcaption>{html.escape(self.caption)}</figcaption></figure>'

    def _image_map(self, fig: Any, width: int, height: int) -> str:
        # One column per x index, spanning all axes, so hovering anywhere above a point names it.
        # Positions are read from the layout of the last draw, the PNG's (a redraw at another dpi
        # would move the axes by a few pixels).
        axes = fig.axes
        top = max(ax.get_position().y1 for ax in axes)
        bottom = min(ax.get_position().y0 for ax in axes)
        ax = axes[-1]
        pos = ax.get_position()

        def x_css(x: float) -> float:
            frac = ax.transAxes.inverted().transform(ax.transData.transform((x, 0.0)))[0]
            return (pos.x0 + frac * pos.width) * width

        y0, y1 = round((1 - top) * height), round((1 - bottom) * height)
        areas = []
        for i, (anchor, title) in enumerate(self.hover):
            x0, x1 = round(x_css(i - 0.5)), round(x_css(i + 0.5))
            t = html.escape(title)
            areas.append(
                f'<area shape="rect" coords="{x0},{y0},{x1},{y1}" href="#{html.escape(anchor)}" title="{t}" alt="{t}">'
            )
        return f'<map name="map-{self.key}">{"".join(areas)}</map>'


Block = Paragraph | BulletList | Banner | Table | Plot


@dataclass
class Section:
    title: str
    blocks: list[Block]
    anchor: str = ""
