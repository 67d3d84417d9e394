"""The run's settings as a console log states them, each set with where it was printed (the `origin` a fix
quotes): a `TrainingArguments(...)` / `SFTConfig(...)` dump, an argparse `Namespace(...)`, the Trainer's
`***** Running training *****` header, PEFT's trainable-parameters line, a script's banner, fp16 loss-scale
messages. Pure functions over the lines; unknown lines are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prunetune.analysis.sources.base import num

Settings = list[tuple[str, dict[str, Any]]]
"""(origin, {name: value}) pairs, most trusted first."""

# "TrainingArguments(" / "Seq2SeqTrainingArguments(" / "SFTConfig(" / "DPOConfig(" at the end of a line (the
# multi-line dump) or with the fields on the same line (the one-line repr).
_DUMP = re.compile(r"\b(\w*(?:TrainingArguments|Config|Arguments))\((.*)$")
_NAMESPACE = re.compile(r"\bNamespace\((.*)\)\s*$")
# logger prefixes: "[INFO|trainer.py:2128] 2024-03-01 12:00:00,123 >> ", "INFO:transformers.trainer:",
# "03/01/2024 12:00:00 - INFO - transformers.trainer - " (the example scripts' format)
_PREFIX = re.compile(r"^(?:\[[^\]]*\][^>]*>>\s*|[A-Z]+:[\w.]+:\s*|"
                     r"\d{1,4}[/-]\d\d[/-]\d{2,4}[ T][\d:,.]+\s*-\s*[A-Z]+\s*-\s*[\w.]+\s*-\s*)")
_HEADER_ITEMS = {
    "num epochs": "num_train_epochs",
    "instantaneous batch size per device": "per_device_train_batch_size",
    "gradient accumulation steps": "gradient_accumulation_steps",
    "total optimization steps": "max_steps",
    "total train batch size (w. parallel, distributed & accumulation)": "total_train_batch_size",
    "number of trainable parameters": "trainable_params",
}
_HEADER_ITEM = re.compile(r"^\s*([A-Za-z][A-Za-z .,&()]+?)\s*=\s*([\d,.eE+-]+)\s*$")
_PEFT = re.compile(r"trainable params:\s*([\d,]+)\s*\|\|\s*all params:\s*([\d,]+)\s*\|\|\s*trainable%:\s*([\d.eE+-]+)")
_FT_METHOD = re.compile(r"Fine-tuning method:\s*(\w+)", re.IGNORECASE)
_BANNER = re.compile(
    r"^\s*(?:[-*•]\s*)?(learning rate|lr|block size|max(?:imum)? seq(?:uence)? length|epochs|num(?:ber of)? epochs|"
    r"batch size|per[- ]device (?:train )?batch size|gradient accumulation(?: steps)?|warm-?up steps|warm-?up ratio|"
    r"lora r|lora rank|lora dropout|precision|max steps)\s*[:=]\s*([^\s,;]+)\s*$",
    re.IGNORECASE,
)
_BANNER_KEYS = {
    "learning rate": "learning_rate", "lr": "learning_rate", "block size": "block_size",
    "epochs": "num_train_epochs", "num epochs": "num_train_epochs", "number of epochs": "num_train_epochs",
    "batch size": "per_device_train_batch_size", "gradient accumulation": "gradient_accumulation_steps",
    "gradient accumulation steps": "gradient_accumulation_steps", "warmup steps": "warmup_steps",
    "warm-up steps": "warmup_steps", "warmup ratio": "warmup_ratio", "warm-up ratio": "warmup_ratio",
    "lora r": "lora_r", "lora rank": "lora_r", "lora dropout": "lora_dropout", "precision": "precision",
    "max steps": "max_steps",
}
_LOSS_SCALE = re.compile(r"Gradient overflow\.?\s+Skipping step|Attempted loss scale|reducing loss scale to|"
                         r"loss scaler? \S+ reducing", re.IGNORECASE)

ORIGIN_DUMP = "the {name} dump in the log"
ORIGIN_NAMESPACE = "the Namespace(...) arguments printed in the log"
ORIGIN_HEADER = "the training header in the log ('***** Running training *****' or the Unsloth banner)"
ORIGIN_PEFT = "PEFT's 'trainable params' line in the log"
ORIGIN_METHOD = "the 'Fine-tuning method' line in the log"
ORIGIN_BANNER = "the run's banner in the log"
ORIGIN_LOSS_SCALE = "fp16 loss-scale messages in the log"
ORIGIN_COMMAND = "the training command printed in the log"

# a printed command line (`python train.py --learning-rate 2e-4 --gradient-accumulation-steps 4`): its flags that
# name a TrainingArguments field, dashes or underscores, as `--name value` or `--name=value`
_COMMAND = re.compile(r"\bpython[\d.]*\s+\S+\.py\b|\baccelerate launch\b|\btorchrun\b|\bdeepspeed\b")
_FLAG = re.compile(r"--([A-Za-z][\w-]*)(?:=|\s+)([^\s-][^\s]*|-?\d[^\s]*)")
_COMMAND_FIELDS = ("learning_rate", "gradient_accumulation_steps", "per_device_train_batch_size", "num_train_epochs",
                   "max_steps", "warmup_steps", "warmup_ratio", "logging_steps", "eval_steps", "save_steps",
                   "lr_scheduler_type", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout")


def command_flags(line: str) -> dict[str, Any]:
    """The TrainingArguments fields a printed command line sets (empty for any other line)."""
    if _COMMAND.search(line) is None:
        return {}
    flags = {m.group(1).replace("-", "_").lower(): scalar(m.group(2)) for m in _FLAG.finditer(line)}
    return {k: v for k, v in flags.items() if k in _COMMAND_FIELDS}


def scalar(text: str) -> Any:
    """A printed value as Python: numbers, True/False/None, `IntervalStrategy.STEPS` -> `steps`, else the
    string without its quotes."""
    text = text.strip().rstrip(",").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text in ("None", "null"):
        return None
    enum = re.match(r"^<?\w+\.(\w+)(?::\s*'([^']*)'>)?$", text)
    if enum and not re.match(r"^[\d.eE+-]+$", text):
        return (enum.group(2) or enum.group(1)).lower()
    value = num(text.replace(",", "") if re.fullmatch(r"[\d,]+", text) else text)
    if isinstance(value, float) and value.is_integer() and re.fullmatch(r"-?[\d,]+", text):
        return int(value)
    return value if value is not None else text


def key_values(text: str) -> dict[str, Any]:
    """`a=1, b='x, y', c=[1, 2]` -> {a: 1, b: 'x, y', c: '[1, 2]'}: split at commas outside brackets and quotes."""
    out: dict[str, Any] = {}
    depth, quote, start = 0, "", 0
    pieces = []
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    for piece in pieces:
        key, sep, value = piece.partition("=")
        key = key.strip()
        if sep and re.fullmatch(r"[A-Za-z_]\w*", key):
            out[key] = scalar(value)
    return out


def _dump(lines: Sequence[str], i: int, name: str, rest: str) -> tuple[dict[str, Any], int]:
    """The fields of a dump starting at line i; (fields, lines consumed)."""
    if rest.strip() and rest.rstrip().endswith(")"):
        return key_values(rest.rstrip()[:-1]), 1  # the one-line repr
    fields: dict[str, Any] = key_values(rest) if rest.strip() else {}
    k = i + 1
    while k < len(lines) and k - i < 600:
        line = lines[k].strip()
        if line in (")", "),"):
            return fields, k - i + 1
        match = re.match(r"^([A-Za-z_]\w*)=(.*)$", line)
        if match is None:
            break
        fields[match.group(1)] = scalar(match.group(2))
        k += 1
    return fields, k - i


_PIPE_ITEMS = {**_HEADER_ITEMS, "total steps": "max_steps", "batch size per device": "per_device_train_batch_size"}


def _pipe_items(line: str) -> dict[str, float]:
    """`Num examples = 10,813 | Num Epochs = 1 | Total steps = 300` -> the known items among them."""
    out = {}
    for part in re.split(r"\s\|\s", re.sub(r"^[^A-Za-z]*", "", line)):
        m = re.match(r"^\s*([A-Za-z][A-Za-z ]+?)\s*=\s*([\d,.]+)\s*$", part)
        if m and m.group(1).lower() in _PIPE_ITEMS and isinstance(value := num(m.group(2).replace(",", "")), float):
            out[_PIPE_ITEMS[m.group(1).lower()]] = value
    return out


def settings_from_lines(lines: Sequence[str]) -> Settings:
    """Every set of settings the console prints, most trusted first (explicit dumps before the header, the
    header before a banner): [(origin, fields)]."""
    dumps: Settings = []
    header: dict[str, Any] = {}
    banner: dict[str, Any] = {}
    hints: Settings = []
    i = 0
    while i < len(lines):
        line = _PREFIX.sub("", lines[i])
        if (m := _DUMP.search(line)) is not None and ("=" in m.group(2) or not m.group(2).strip()):
            fields, used = _dump(lines, i, m.group(1), m.group(2))
            if len(fields) >= 3:
                dumps.append((ORIGIN_DUMP.format(name=f"{m.group(1)}(...)"), fields))
                i += used
                continue
        if (m := _NAMESPACE.search(line)) is not None:
            fields = key_values(m.group(1))
            if fields:
                dumps.append((ORIGIN_NAMESPACE, fields))
        elif " | " in line and "=" in line and (banner_items := _pipe_items(line)):
            for key, value in banner_items.items():
                header.setdefault(key, value)  # unsloth's banner: "Num Epochs = 1 | Total steps = 300"
        elif (m := _HEADER_ITEM.match(line)) is not None and m.group(1).strip().lower() in _HEADER_ITEMS:
            value = num(m.group(2).replace(",", ""))
            if isinstance(value, float):
                header.setdefault(_HEADER_ITEMS[m.group(1).strip().lower()], value)
        elif (m := _PEFT.search(line)) is not None:
            share = num(m.group(3))
            fields = {"trainable_params": num(m.group(1).replace(",", "")),
                      "all_params": num(m.group(2).replace(",", ""))}
            if isinstance(share, float) and share < 50:
                fields["peft"] = True  # an adapter trains a small share of the weights
            hints.append((ORIGIN_PEFT, fields))
        elif (m := _FT_METHOD.search(line)) is not None:
            hints.append((ORIGIN_METHOD, {"finetuning_type": m.group(1).lower()}))
        elif (m := _BANNER.match(line)) is not None:
            key = _BANNER_KEYS.get(m.group(1).lower().replace("-", " ").replace("  ", " "),
                                   _BANNER_KEYS.get(m.group(1).lower()))
            if key is not None:
                banner.setdefault(key, scalar(m.group(2)))
        elif fields := command_flags(line):
            dumps.append((ORIGIN_COMMAND, fields))
        elif _LOSS_SCALE.search(line) and not any(o == ORIGIN_LOSS_SCALE for o, _ in hints):
            hints.append((ORIGIN_LOSS_SCALE, {"fp16": True, "loss_scale_messages": True}))
        i += 1
    out = list(dumps)
    if header:
        out.append((ORIGIN_HEADER, {k: int(v) if float(v).is_integer() else v for k, v in header.items()}))
    out += hints
    if banner:
        out.append((ORIGIN_BANNER, banner))
    return out
