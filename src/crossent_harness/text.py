"""Text for a terminal: docstrings without their reStructuredText markup, wrapped to at most 100 columns.

The harness's help and tables come from docstrings written for Sphinx (````x````, ``:func:`x```,
``*title*``). :func:`plain` removes that markup, :func:`markdown` turns it into Markdown, and
:func:`reflow` wraps paragraphs and bullet lists to a width; :class:`HelpFormatter` applies them to
every ``--help`` of the ``crossent`` commands.
"""

from __future__ import annotations

import argparse
import re
import shutil
import textwrap

#: The widest line the commands print for a terminal (narrower terminals get narrower lines).
MAX_WIDTH = 100

_ROLE = re.compile(r":(?:[\w-]+:)+`([^`]+)`")  # :func:`x`, :py:class:`~a.b`, :math:`q`
_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"(?<![\w`])`([^`]+)`(?![\w`])")  # `x`: the default role
_EMPHASIS = re.compile(r"(?<![\w*])(\*{1,2})(?=\S)([^*]+?)(?<=\S)\1(?![\w*])")  # *title*, **strong**


def _role_text(match: re.Match) -> str:
    target = match.group(1)
    # `~a.b.name` shows the last part; `text <target>` shows the text
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return re.sub(r"\s*<[^>]+>$", "", target)


def plain(text: str) -> str:
    """``text`` without inline reStructuredText markup.

    >>> plain("``F.cross_entropy`` via :func:`~crossent.linear_cross_entropy`, *robust*, :math:`q`")
    'F.cross_entropy via linear_cross_entropy, robust, q'
    >>> plain("a * b and 2*x")
    'a * b and 2*x'
    """
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    return _EMPHASIS.sub(r"\2", text)


def markdown(text: str) -> str:
    """``text`` with reStructuredText's literals and roles as Markdown code spans.

    >>> markdown("``ALDRLoss_V1`` and :math:`L_p`, *noisy*")
    '`ALDRLoss_V1` and `L_p`, *noisy*'
    """
    return _LITERAL.sub(r"`\1`", _ROLE.sub(lambda m: f"`{_role_text(m)}`", text))


def width() -> int:
    """The terminal's width (``COLUMNS`` when set), at most :data:`MAX_WIDTH`, less argparse's margin of 2."""
    return max(20, min(MAX_WIDTH, shutil.get_terminal_size().columns - 2))


_BULLET = re.compile(r"^([*-] )")


def reflow(text: str, columns: int, indent: str = "") -> str:
    """Plain paragraphs and bullet items of ``text``, each wrapped to ``columns``.

    Paragraphs are separated by blank lines; an item starts with ``* `` or ``- `` and runs until the next
    item or blank line. A block whose lines are all indented (an example command) is kept as it is.

    >>> print(reflow("One ``two``\\nthree.\\n\\n* a long\\n  item\\n* b", 12))
    One two
    three.
    <BLANKLINE>
    * a long
      item
    * b
    """
    out: list[str] = []
    for block in re.split(r"\n\s*\n", textwrap.dedent(text).strip("\n")):
        lines = block.splitlines()
        if all(line.startswith("    ") for line in lines):
            out.append("\n".join(indent + line for line in lines))
            continue
        items: list[list[str]] = []
        for line in lines:
            if _BULLET.match(line.strip()) or not items:
                items.append([line.strip()])
            else:
                items[-1].append(line.strip())
        wrapped = []
        for item in items:
            words = plain(" ".join(item))
            bullet = _BULLET.match(words)
            hang = " " * len(bullet.group(1)) if bullet else ""
            wrapped.append(textwrap.fill(words, columns, initial_indent=indent, subsequent_indent=indent + hang,
                                         break_on_hyphens=False))
        out.append("\n".join(wrapped))
    return "\n\n".join(out)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help as plain text of at most :data:`MAX_WIDTH` columns: docstrings reflowed, markup removed."""

    def __init__(self, prog, **kwargs):
        kwargs["width"] = min(kwargs.get("width") or width(), MAX_WIDTH)
        super().__init__(prog, **kwargs)

    def _fill_text(self, text, columns, indent):
        return reflow(text, columns, indent)

    def _split_lines(self, text, columns):
        return textwrap.wrap(plain(" ".join(text.split())), columns, break_on_hyphens=False)
