"""Jinja2 templates of medsim's HTML reports, shipped as package data (``*.html.j2``), rendered with autoescape on:
every value is escaped unless a caller marks it safe (``markupsafe.Markup``).

* ``duplicates.html.j2``: the page of ``medsim duplicates --html`` (:func:`medsim.duplicates.write_html`).
* ``evaluation.html.j2``: ``index.html`` of ``medsim evaluate`` (:func:`medsim.evaluate.report.render_html`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment of the report templates: autoescape on, undefined values are errors, block tags on
    their own lines leave no blank lines; filter ``thousands`` (12,345)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=False, undefined=jinja2.StrictUndefined)
    env.filters["thousands"] = lambda number: f"{number:,}"  # 12345 -> 12,345
    return env


def get_template(name: str):
    return environment().get_template(name)
