"""Reading a file qeval wrote, without trusting what is there now.

A path where qeval keeps a file may hold something else by the time it is read: a directory, a
FIFO (opening one for reading would wait forever for a writer), a device. :func:`open_regular`
opens without blocking and names what it found. A JSON record qeval writes (result.json,
calibration.json) is :func:`sealed`: it carries the checksum of its other keys, so an edit or a
damaged byte is seen when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path


class NotAFile(ValueError):
    """A directory, FIFO, socket or device where qeval keeps a file; the message names which."""


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path):
    """``path`` opened for binary reading if it is a regular file; :class:`NotAFile` otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):   # checked before open(): it raises its own error for a directory
        os.close(fd)
        raise NotAFile(f"{path} is {kind(mode)}, not a file")
    return open(fd, "rb")


def read_bytes(path: Path) -> bytes:
    with open_regular(path) as f:
        return f.read()


def problem_reading(path: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, what is wrong with ``path``: missing, not a file, unreadable)."""
    try:
        return read_bytes(path), None
    except FileNotFoundError:
        return None, f"{path} is missing"
    except NotAFile as e:
        return None, str(e)
    except OSError as e:
        return None, f"{path} is unreadable ({e.strerror or type(e).__name__})"


def sha256_of(path: Path) -> str:
    """The checksum of a regular file, read in blocks (a calibration result may be gigabytes)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _seal_of(body: dict) -> str:
    text = json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(record: dict) -> dict:
    """``record`` as JSON gives it back, with ``sha256``: the checksum of everything else in it."""
    body = {k: v for k, v in json.loads(json.dumps(record, default=str)).items() if k != "sha256"}
    return body | {"sha256": _seal_of(body)}


def seal_matches(record: dict) -> bool:
    """False when ``record`` carries a ``sha256`` its other keys no longer give (changed or
    damaged); True without one (written before records were sealed)."""
    return "sha256" not in record or record["sha256"] == _seal_of(record)
