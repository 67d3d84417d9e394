"""Write what `prunetune export` measured (sizes, read-back checks, perplexity read back by Transformers) into
bench/RESULTS.md, section `exports`, from the export.json files of the given directories.

    .venv/bin/python bench/runtimes/record_exports.py /work/rt/gguf-bf16 /work/rt/gguf-q8_0 ... --note "..."

Each export.json carries its own provenance (versions, commit, machine); the section adds the load at the time
of recording and the note (e.g. the load while the exports ran).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import machine_line, write_section


def row(record: dict) -> str:
    kind = record.get("gguf_type") or record.get("dtype") or record.get("compressor") or ""
    size = record.get("bytes", {})
    before = size.get("source_safetensors") or size.get("dense_safetensors")
    after = size.get("gguf") or size.get("safetensors") or size.get("compressed_safetensors")
    ppl = record.get("perplexity") or {}
    zeros = (f"{record['zeros_kept']:,} / {record['zeros_source']:,}" if "zeros_kept" in record else "-")
    read = (f"{ppl['source']:.2f} -> {ppl['gguf_read_by_transformers']:.2f} ({ppl['change']:+.2%})" if ppl else "-")
    return (f"| {record['format']} {kind} | {record['pattern']} | {before / 2**20:,.1f} -> {after / 2**20:,.1f} MiB | "
            f"{record.get('verified')} | {zeros} | {record.get('new_zeros', '-')} | {read} | "
            f"{record.get('git_commit', '')[:7]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    records = [json.loads((Path(d) / "export.json").read_text()) for d in args.exports]
    body = "\n".join([
        machine_line(), "", args.note, "",
        "| export | pattern | size | tensors read back | pruned zeros still 0 | weights rounded to 0 | "
        "perplexity source -> read back by Transformers (4 x 256 wikitext2 test, float32) | commit |",
        "|---|---|---|---:|---|---:|---|---|",
        *[row(r) for r in records],
    ])
    write_section("exports", "Export formats, read back (prunetune export, issue 21)", body)


if __name__ == "__main__":
    main()
