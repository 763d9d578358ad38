"""Accuracy and coverage reports: report.json is the single source; report.md and a self-contained
report.html (inline CSS, matplotlib plots as base64 PNG) are rendered from it and nothing else.

`document` owns report.json (schema, histograms, reading, writing all three files), `sections` lays
the report out once as sections of `blocks`, which `markdown`, `page` (HTML) and the notebook
(notebooks/accuracy_report.ipynb) each render; `plots` makes the figures, `format` the numbers.
Every section but the title is optional: what the report lacks is shown as "not measured".
"""

from quantkit.report.blocks import Banner, Block, BulletList, Paragraph, Plot, Section, Table
from quantkit.report.document import (SCHEMA, _json_safe, build_error_histogram, histogram_of_errors, load_report,
                                      write_reports)
from quantkit.report.format import (NOT_MEASURED, PRECISION_COLORS, PRECISION_ORDER, RUNTIME_COLORS, RUNTIMES, _fmt,
                                    fmt_bytes, fmt_int, fmt_percent)
from quantkit.report.markdown import render_markdown, sections_markdown
from quantkit.report.page import render_html, sections_html
from quantkit.report.plots import figure_png, plot_coverage, plot_error_histograms, plot_per_layer
from quantkit.report.sections import report_sections, runtime_status

__all__ = [
    "Banner", "Block", "BulletList", "NOT_MEASURED", "PRECISION_COLORS", "PRECISION_ORDER", "Paragraph", "Plot",
    "RUNTIMES", "RUNTIME_COLORS", "SCHEMA", "Section", "Table", "build_error_histogram", "figure_png", "fmt_bytes",
    "fmt_int", "fmt_percent", "histogram_of_errors", "load_report", "plot_coverage", "plot_error_histograms",
    "plot_per_layer", "render_html", "render_markdown", "report_sections", "runtime_status", "sections_html",
    "sections_markdown", "write_reports",
]
