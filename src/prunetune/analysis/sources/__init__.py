"""Turn whatever a user has into `prunetune.records` dicts, one module per log format:

- `base`:              `Source` (records + where they came from), shared conversions;
- `trainer_state`:     Transformers `trainer_state.json` (`log_history`) and the Trainer's log dicts;
- `trainer_console`:   the raw console log of any Trainer run (dicts, tqdm bars, metrics blocks, notebook tables);
- `loader`:            which reader a path needs (`load_source`: a run directory's richest source).
"""

from prunetune.analysis.sources.base import SOURCE_KINDS, Source
from prunetune.analysis.sources.loader import candidate_files, load_file, load_source
from prunetune.analysis.sources.trainer_console import parse_console_log, parse_python_dict
from prunetune.analysis.sources.trainer_state import record_from_trainer_dict, records_from_trainer_state

__all__ = [
    "SOURCE_KINDS",
    "Source",
    "candidate_files",
    "load_file",
    "load_source",
    "parse_console_log",
    "parse_python_dict",
    "record_from_trainer_dict",
    "records_from_trainer_state",
]
