"""The metrics record: one JSON object per line in `metrics.jsonl`, flushed per line.

Every console line of a training run is rendered from one of these records, so the log a machine reads and
the text a person reads never disagree. Common keys: `event` (kind of record), `step` (optimizer step),
`time` (unix seconds). Event kinds and their main keys:

- `log`:        epoch, loss, lr, grad_norm, tokens_per_s, memory_mb, memory_kind (gpu|rss), max_steps,
                elapsed, eta_s
- `eval`:       epoch, eval_loss, perplexity, eval_runtime, eval_samples_per_second, eval_steps_per_second,
                is_best, best_before, best_step
- `checkpoint`: path, ok, reason
- `alert`:      kind (see prunetune.analysis.rules), severity, message, evidence, fix, anomaly_step
- `error`:      kind (e.g. out_of_memory), message, fix
- `finetune` writes, in order: `config`, `preflight`, `resume`, `model`, `lora`, `dataset`, `baseline_eval`,
  `estimate`, `train_start`, then `log`/`eval`/`checkpoint`/`alert` while training, then `train_end` (or
  `stopped`, or `message` of kind `signal`), `best_loaded`, `final_eval`, `sparsity_check`, `adapter_saved`,
  `summary`; each carries its own keys (prunetune.finetune.engine documents them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from prunetune.errors import UserError
from prunetune.fmt import json_safe, to_float
from prunetune.rundir.reading import reading

__all__ = ["JsonlWriter", "iter_jsonl", "make_record", "read_jsonl", "to_float"]


def make_record(event: str, step: int | None, **fields: Any) -> dict[str, Any]:
    return {"event": event, "step": step, "time": time.time(), **fields}


class JsonlWriter:
    """Appends records to a JSONL file, one flushed line each, so a live reader never waits for a buffer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(json_safe(record), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a write a full disk or a kill cut short) before appending, so the
    next record starts on a line of its own instead of being glued to the broken one."""
    try:
        with path.open("rb+") as f:
            size = f.seek(0, 2)
            if size == 0:
                return
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size))
    except FileNotFoundError:
        return


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file that may still be being written: a partial or corrupt last line is skipped.

    A file that cannot be read as text (missing, a directory, permission denied, binary) is a UserError
    naming it."""
    path = Path(path)
    with reading(path, "metrics file"), path.open("rb") as f:
        offset = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the writer is mid-line; the record appears on the next read
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{str(path)!r} is not a text JSONL file (byte 0x{raw[err.start]:02x} at byte "
                                f"offset {offset + err.start} is not UTF-8); give a run's metrics.jsonl") from None
            offset += len(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))
