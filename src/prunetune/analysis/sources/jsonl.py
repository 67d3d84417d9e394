"""Reading a JSONL log the way a user may hand it over: still being written, with a corrupt line, or not a
JSONL file at all (binary, unreadable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunetune.errors import UserError

PASS_A_LOG = "pass the run's metrics.jsonl, trainer_log.jsonl, trainer_state.json or console log"


def read_log_bytes(path: Path, what: str = "log", binary_note: str = "") -> bytes:
    """A log file's bytes; unreadable or binary files are a one-line UserError naming the file and the fix."""
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the {what} readable (chmod +r) or copy it") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path} is a binary file{binary_note}: no training records found in it; {PASS_A_LOG}")
    return raw


def read_jsonl(path: Path, what: str = "JSONL log") -> tuple[list[dict[str, Any]], int]:
    """(object lines, number of lines skipped). A partial last line (the writer is mid-line) and corrupt lines
    are skipped; a binary or unreadable file is a one-line UserError naming it."""
    raw = read_log_bytes(path, what, f", not a {what} (one JSON object per line)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); it is not a {what}: {PASS_A_LOG}") from None
    records: list[dict[str, Any]] = []
    skipped = 0
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # no newline after it: the writer is mid-line, the record appears on the next read
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(value, dict):
            records.append(value)
        else:
            skipped += 1
    return records, skipped
