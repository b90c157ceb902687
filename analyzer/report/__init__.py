"""Reports rendered from the report of schema version 1 (schema.md; its types in schema.py):
text for terminals and logs, one self-contained HTML page (its timelines in timeline.py)."""

from bitstrace.analyzer.report.html import render_html, write_html
from bitstrace.analyzer.report.text import render_text

__all__ = ["render_html", "render_text", "write_html"]
