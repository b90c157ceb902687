"""Reports rendered from the report dict of schema version 1 (schema.md): text for terminals
and logs, one self-contained HTML page."""

from bitstrace.analyzer.report.html import render_html, write_html
from bitstrace.analyzer.report.text import render_text

__all__ = ["render_html", "render_text", "write_html"]
