"""Shared by the bench scripts: each owns one section of bench/RESULTS.md and rewrites only that section."""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunetune.runinfo import git_commit, machine, versions

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def machine_line() -> str:
    m = machine()
    v = versions()
    load = os.getloadavg()[0]
    return (
        f"Machine: {m['processor']} (family {m.get('cpu_family')}, native bf16: {m.get('cpu_bf16')}, torch "
        f"{m.get('torch_cpu_capability')} kernels), {m['cpu_count']} CPUs, {m['memory_gib']} GiB"
        + (f", GPUs: {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU")
        + f"; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
        f"load average at start {load:.2f}; commit {git_commit() or 'unknown'}; "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body` under `## title`."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
