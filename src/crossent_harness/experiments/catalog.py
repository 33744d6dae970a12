"""The table of ``crossent losses``: every registered loss with its hyperparameters, formula, paper and
whether it streams, read from the loss classes themselves (signatures and docstrings).

The docstrings are reStructuredText; the ``text`` format (the terminal's) prints them as plain text
wrapped to at most 100 columns, the ``markdown`` table with Markdown code spans.
"""

from __future__ import annotations

import inspect
import math
import textwrap

from ..records import strict_json
from ..text import markdown, plain, width

#: Shown for a hyperparameter without a default.
REQUIRED = "required"


def _doc_lines(cls) -> list[str]:
    return [line.strip() for line in (inspect.getdoc(cls) or "").splitlines()]


def loss_formula(cls) -> str:
    """``cls.formula`` if set, else the first line of the docstring."""
    formula = getattr(cls, "formula", "")
    if formula:
        return str(formula)
    lines = [line for line in _doc_lines(cls) if line]
    return lines[0] if lines else ""


def loss_paper(cls) -> str:
    """``cls.paper`` if set, else the docstring's ``Reference:`` line (or ``Paper:``), unwrapped."""
    paper = getattr(cls, "paper", "")
    if paper:
        return str(paper)
    lines = _doc_lines(cls)
    for i, line in enumerate(lines):
        for tag in ("Reference:", "References:", "Paper:"):
            if line.startswith(tag):
                text = [line[len(tag) :].strip()]
                for more in lines[i + 1 :]:  # the reference may wrap over several lines
                    if not more:
                        break
                    text.append(more)
                return " ".join(t for t in text if t)
    return ""


def loss_streams(cls) -> str:
    """``yes``/``no``; for losses where it depends on hyperparameters, the answer at the defaults."""
    value = inspect.getattr_static(cls, "streamable", None)
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        default = cls()
    except (TypeError, ValueError):  # a required hyperparameter (e.g. a transition matrix)
        return "depends on hyperparameters"
    return ("yes" if default.streamable else "no") + " at defaults; depends on hyperparameters"


def _plain(value):
    """A default as JSON can hold it (tuples as lists, an infinite float or anything else exotic as its repr)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "inf": JSON has no infinity, and null would read as a default of None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return repr(value)


def hyperparameters(cls) -> list[dict]:
    """``[{"name", "default"}]`` in signature order; ``{"name", "required": True}`` without a default."""
    out = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            out.append({"name": p.name, "required": True})
        else:
            out.append({"name": p.name, "default": _plain(p.default)})
    return out


def hyperparameter_text(cls) -> str:
    """``q=0.7, k=0.5`` (``T (required)`` for one without a default; ``-`` for none)."""
    parts = []
    for h in hyperparameters(cls):
        if h.get("required"):
            parts.append(f"{h['name']} ({REQUIRED})")
        else:
            default = h["default"]
            parts.append(f"{h['name']}={strict_json(default) if isinstance(default, str) else default}")
    return ", ".join(parts) or "-"


def rows() -> list[dict]:
    """One record per registered loss, sorted by name."""
    from crossent import losses

    return [
        {"name": name, "hyperparameters": hyperparameters(cls), "formula": loss_formula(cls), "paper": loss_paper(cls),
         "streams": loss_streams(cls), "_hp_text": hyperparameter_text(cls)}
        for name, cls in sorted(losses.registered().items())
    ]


FORMATS = ("text", "markdown", "json", "names")


def _text(table: list[dict], columns: int) -> str:
    """One entry per loss for a terminal: plain text, no line over ``columns``."""

    def field(label: str, value: str) -> str:
        return textwrap.fill(plain(value), columns, initial_indent=f"    {label}", break_on_hyphens=False,
                             subsequent_indent=" " * (4 + len(label)))

    out = []
    for r in table:
        head = textwrap.fill(f"{r['name']}  (streams: {r['streams']})", columns, subsequent_indent="    ")
        out += [head, field("", r["formula"]),
                field("hyperparameters: ", r["_hp_text"])]
        if r["paper"]:
            out.append(field("paper: ", r["paper"]))
        out.append("")
    return "\n".join(out).rstrip("\n")


def render(fmt: str = "text", columns: int | None = None) -> str:
    """The table as ``text`` (for a terminal: ``columns`` wide, default the terminal's, at most 100),
    a ``markdown`` table, ``json`` or bare ``names`` (one a line)."""
    table = rows()
    if fmt == "json":
        return strict_json([{k: v for k, v in r.items() if not k.startswith("_")} for r in table], indent=1)
    if fmt == "names":
        return "\n".join(r["name"] for r in table)
    if fmt == "text":
        return _text(table, columns or width())
    if fmt != "markdown":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def cell(text: str) -> str:
        return markdown(text).replace("|", "\\|")

    out = ["| name | hyperparameters (defaults) | formula | paper | streams |", "|---|---|---|---|---|"]
    for r in table:
        out.append(f"| `{r['name']}` | {cell(r['_hp_text'])} | {cell(r['formula'])} | {cell(r['paper'])} | {r['streams']} |")
    return "\n".join(out)
