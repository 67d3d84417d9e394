"""The rules measured on a labelled corpus of real logs (`tests/fixtures/real/`: one directory per log, hand
labels in `labels.json` frozen before any rule ran on them): per-kind precision and recall, on a dev half (to
tune on) and a test half (to check that the tuning generalises), split by a fixed hash of each case's name
chosen before the corpus was seen.
"""

from __future__ import annotations

import hashlib


def split(name: str) -> str:
    """`dev` or `test`: the first byte of the SHA-256 of the case name, even -> dev, odd -> test. Fixed before
    the corpus was looked at, so neither half was picked by how the rules do on it."""
    return "dev" if hashlib.sha256(name.encode("utf-8")).digest()[0] % 2 == 0 else "test"
