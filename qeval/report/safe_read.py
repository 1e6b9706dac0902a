"""Reading files the report did not write, without hanging, exhausting memory or trusting them.

A results directory may be shared, copied from elsewhere or simply damaged: a ``rows.jsonl`` may
be a FIFO (an ``open`` that never returns), a device, a file of gigabytes, and a ``config.yaml``
may be a "billion laughs" alias bomb of 1.5 KB that expands into millions of nodes. So:

* only regular files are read: the file is opened non-blocking (a FIFO's open returns at once)
  and ``fstat`` of the open descriptor decides, so nothing can be swapped in between;
* every read has a size cap (:data:`ROWS_BYTES` for rows and results, :data:`SMALL_BYTES` for a
  YAML or JSON side file), checked on the size and again on what is actually read;
* YAML is read with :class:`BoundedLoader`: safe types only, at most :data:`YAML_ALIASES` alias
  uses and :data:`YAML_NODES` nodes counted through every alias.

Each refusal is a :class:`Refused` whose message names the file and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from qeval.files.checked import NotAFile, open_regular

ROWS_BYTES = 64 * 2**20    # rows.jsonl and result.json (which repeats the rows)
SMALL_BYTES = 2**20        # config.yaml, a sweep's markers, a benchmark's JSON
YAML_ALIASES = 100         # a resolved config has none; a few are a hand-written file's
YAML_NODES = 100_000       # a real config has hundreds; counted through aliases, so a bomb stops
PARSE_ERRORS = (ValueError, RecursionError, yaml.YAMLError)   # what a damaged file raises on parsing


class Refused(ValueError):
    """A file the report will not read (not a regular file, too large, not text, too nested)."""


def read_bytes(path: Path, limit: int) -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes, else :class:`Refused`.
    Never blocks: a FIFO or device is refused without being read (:func:`open_regular`)."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise Refused(f"{path}: {size} bytes, more than the {limit} read")
            data = f.read(limit + 1)   # a file that grows while read still stops at the cap
    except NotAFile as e:
        raise Refused(str(e)) from None
    except OSError as e:
        raise Refused(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        raise Refused(f"{path}: more than the {limit} bytes read")
    return data


def read_text(path: Path, limit: int) -> str:
    """``read_bytes`` decoded as UTF-8 (a file that is not is refused)."""
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json(path: Path, limit: int = SMALL_BYTES):
    """The JSON value in ``path``; :class:`Refused` for a file that is not JSON."""
    text = read_text(path, limit)
    try:
        return json.loads(text)
    except PARSE_ERRORS as e:
        raise Refused(f"{path}: not JSON ({type(e).__name__})") from None


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a budget: at most :data:`YAML_ALIASES` aliases, and at most
    :data:`YAML_NODES` nodes in the document counted with every alias expanded (an alias bomb or
    a self-referencing document is refused before anything is built from it)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > YAML_ALIASES:
                raise yaml.YAMLError(f"more than {YAML_ALIASES} aliases")
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        count_nodes(node, YAML_NODES)
        return node


def count_nodes(root, limit: int) -> int:
    """Nodes of a composed YAML graph, aliases expanded; YAMLError past ``limit`` (iterative, so a
    cycle or a deep document stops at the limit instead of recursing)."""
    seen, stack = 0, [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise yaml.YAMLError(f"more than {limit} nodes once aliases are expanded")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    return seen


def read_yaml(path: Path, limit: int = SMALL_BYTES):
    """The YAML document in ``path`` through :class:`BoundedLoader`."""
    text = read_text(path, limit)
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except PARSE_ERRORS as e:
        raise Refused(f"{path}: not a YAML document qeval reads ({one_line_error(e)})") from None


def one_line_error(e: Exception) -> str:
    """``type: first line`` of an exception, for a warning line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
