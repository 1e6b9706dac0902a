"""Every value the report writes is escaped for the format it lands in, because names come from
rows and configs that anyone can write (a model called ``<script>`` or ``a | b``, a task with a
newline, a setting that starts with ``=``).

* :func:`md`: a Markdown table cell or heading: ``|`` and backslash and backticks escaped, ``<``,
  ``>`` and ``&`` as HTML entities, line breaks and control characters as spaces, ``](`` broken so
  no link is formed. No cell, row or raw HTML can be fabricated.
* :func:`tex`: LaTeX text: every one of ``\\ { } $ & # ^ _ % ~`` (and ``< > |``, which the
  default font encoding prints as other glyphs), line breaks as spaces.
* :func:`csv_cell`: a text cell that a spreadsheet would read as a formula (first character
  ``= + - @``, tab or carriage return) gets a leading single quote, as OWASP advises; numbers,
  negative ones included, are left as numbers.
* :func:`file_name`: a name that becomes a file name: no separators, NUL or control characters,
  at most :data:`FILE_NAME_BYTES` bytes, with a short hash where it was changed beyond the
  usual ``/`` and ``,`` so that two names never share a file.
* :func:`cut`: long text shortened for a label (:data:`LABEL_CHARS`, with an ellipsis).
* :func:`printable`: text for a terminal line, without control characters (no escape sequences).
"""

from __future__ import annotations

import hashlib
import unicodedata

LABEL_CHARS = 80        # a label (figure legend, tick, title part, table name) longer than this is cut
FILE_NAME_BYTES = 120   # UTF-8 bytes; well under the 255 a file name may take, with room for a suffix
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # OWASP's list for CSV injection
ELLIPSIS = "…"

_TEX = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
        "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}",
        "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "–": "--"}
_MD = {"\\": "\\\\", "|": "\\|", "`": "\\`", "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _breaks_line(ch: str) -> bool:
    """Control characters and every character that some reader takes as a line end."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def one_line(text) -> str:
    """``text`` as a string on one line: line breaks and control characters become spaces, a lone
    surrogate (valid in JSON, not in UTF-8) the replacement character."""
    s = str(text)
    if s.isprintable():   # the common case, fast (isprintable is False for any control character)
        return s
    return "".join(" " if _breaks_line(ch) else "\ufffd" if unicodedata.category(ch) == "Cs" else ch
                   for ch in s)


def printable(text) -> str:
    """For a terminal: one line, no control characters (a hostile name cannot move the cursor)."""
    return one_line(text)


def cut(text, limit: int = LABEL_CHARS) -> str:
    """``text`` (one line) shortened to ``limit`` characters, the last an ellipsis when cut."""
    s = one_line(text) if len(str(text)) <= 4 * limit else one_line(str(text)[:4 * limit])
    return s if len(s) <= limit else s[:limit - 1] + ELLIPSIS


def md(text, limit: int | None = None) -> str:
    """Text for a Markdown table cell, heading or line (optionally cut to ``limit`` first)."""
    s = cut(text, limit) if limit else one_line(text)
    s = "".join(_MD.get(ch, ch) for ch in s)
    return s.replace("](", "]\\(")   # no inline link (a ``javascript:`` target, say)


def tex(text, limit: int | None = None) -> str:
    """Text for LaTeX (optionally cut to ``limit`` first)."""
    s = cut(text, limit) if limit else one_line(text)
    return "".join(_TEX.get(ch, ch) for ch in s)


def csv_cell(value):
    """A CSV cell that a spreadsheet cannot run: text starting like a formula gets a ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def file_name(name) -> str:
    """A file name (no directory) for ``name``: ``/`` and ``,`` as ``_`` (the usual case, names
    unchanged otherwise); anything else a file name must not hold is replaced and a hash of the
    full name appended, so that different names stay different files."""
    s = str(name)
    plain = s.replace("/", "_").replace(",", "_")
    safe = "".join("_" if _breaks_line(ch) or ch == "\\" or unicodedata.category(ch) == "Cs" else ch
                   for ch in plain[:FILE_NAME_BYTES + 1])
    if safe.startswith("."):
        safe = "_" + safe   # never hidden, never "." or ".."
    safe = safe or "_"
    if safe == plain and len(safe.encode()) <= FILE_NAME_BYTES:
        return safe
    tag = hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    head = safe.encode()[:FILE_NAME_BYTES - 11].decode("utf-8", "ignore")   # whole characters only
    return f"{head}-{tag}"


def figure_text(text, limit: int = LABEL_CHARS) -> str:
    """A label for matplotlib: cut, and ``$`` escaped so that no mathtext is parsed (a hostile
    name with two dollar signs would otherwise be typeset, or fail to draw)."""
    return cut(text, limit).replace("$", r"\$")
