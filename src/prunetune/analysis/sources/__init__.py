"""Turn whatever a user has into `prunetune.rundir.records` dicts, one module per log format (`registry.READERS`):

- `base`:              `LogReader` (the Protocol of a format) and `Source` (records + where they came from);
- `registry`:          the registered readers, richest first; a new format is one module and one line there;
- `metrics_jsonl`, `prunetune_console`: prunetune's own metrics.jsonl, and its train.log read through it;
- `trainer_state`:     Transformers `trainer_state.json` (`log_history`) and the Trainer's log dicts;
- `llamafactory`:      LLaMA-Factory's `trainer_log.jsonl`;
- `wanda_console`:     the Wanda-fork LoRA console's own lines;
- `trainer_console`:   the raw console log of any Trainer run (dicts, tqdm bars, metrics blocks, notebook tables);
- `settings`:          the run's settings as a console prints them (argument dumps, the training header);
- `loader`:            which reader a path needs (`load_source`: a run directory's richest source).
"""

from prunetune.analysis.sources.base import LogReader, Source
from prunetune.analysis.sources.loader import candidate_files, load_file, load_source
from prunetune.analysis.sources.registry import source_kinds
from prunetune.analysis.sources.trainer_console import parse_console_log, parse_python_dict
from prunetune.analysis.sources.trainer_state import record_from_trainer_dict, records_from_trainer_state

SOURCE_KINDS = source_kinds()
"""The `--source-kind` choices."""

__all__ = [
    "SOURCE_KINDS",
    "LogReader",
    "Source",
    "candidate_files",
    "load_file",
    "load_source",
    "parse_console_log",
    "parse_python_dict",
    "record_from_trainer_dict",
    "records_from_trainer_state",
]
