"""How numbers, durations and JSON values are written for people and files: one definition of each.

The console, the monitor, the report and the pipeline summary all print through these, so the same value
never reads two ways in two places.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def to_float(value: Any) -> float | None:
    """A value as float (`"nan"`/`"inf"` strings from JSONL included); None when it is not a number. An
    integer too large for a float (`10**400` from a corrupt JSON line) is infinite with its sign, as IEEE
    arithmetic rounds it, never an OverflowError."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return (math.inf if value > 0 else -math.inf) if isinstance(value, int) else None
    except (TypeError, ValueError):
        return None


def hms(seconds: float | None, unknown: str = "?") -> str:
    """0:10:00 style; `unknown` when the duration is not known."""
    number = to_float(seconds)
    if number is None or not math.isfinite(number):
        return unknown
    whole = int(round(max(number, 0)))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def fmt_num(value: Any, spec: str = ".4f", missing: str = "n/a") -> str:
    """`value` formatted with `spec`; NaN/Inf as `nan`/`inf` (they are evidence); `missing` when absent."""
    number = to_float(value)
    if number is None:
        return missing
    if not math.isfinite(number):
        return str(number)
    return format(number, spec)


def fmt_sig(value: Any, digits: int = 4, missing: str = "-") -> str:
    """`digits` significant digits, scientific above 1e6: tables that mix losses and perplexities."""
    number = to_float(value)
    if number is None:
        return missing
    if not math.isfinite(number):
        return str(number)
    return f"{number:.{digits}g}" if abs(number) < 1e6 else f"{number:.3e}"


def fmt_ppl(value: Any, missing: str = "n/a", grouped: bool = False) -> str:
    """A perplexity: two decimals (`grouped`: thousands separators and no decimals from 1,000 on),
    scientific from 1e6 on."""
    number = to_float(value)
    if number is None:
        return missing
    if not math.isfinite(number):
        return str(number)
    if number >= 1e6:
        return f"{number:.3e}"
    if grouped and number >= 1000:
        return f"{number:,.0f}"
    return f"{number:.2f}"


def fmt_lr(value: float) -> str:
    """1e-4 rather than 0.0001 or 1.000000e-04: the way users type an LR."""
    if value >= 0.01:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def perplexity_from_loss(loss: Any) -> float | None:
    """exp(mean token NLL); inf past float range (a diverged run), None when the loss is unknown."""
    number = to_float(loss)
    if number is None:
        return None
    if math.isnan(number):
        return math.nan
    return math.exp(number) if number < 700 else math.inf


def json_safe(value: Any) -> Any:
    """A value strict JSON can carry: NaN/Inf become strings (they are evidence, never dropped), paths and
    other objects their `str`, mapping keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
