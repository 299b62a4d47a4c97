"""Render the jinja2 templates shipped in `templates/` (StrictUndefined, shell-quoting filter)."""

from __future__ import annotations

import shlex
from functools import cache
from importlib import resources

import jinja2


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def render(name: str, **values) -> str:
    """The template `name` with values; a missing value is an error, never an empty string."""
    return _environment().get_template(name).render(**values)
