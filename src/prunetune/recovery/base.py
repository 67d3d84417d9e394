"""The contract of a recovery method. Everything that differs between methods lives behind it: how the model
becomes trainable (parameters and callbacks), the precision rule, how a checkpoint loads, where the result lives
and how it is saved, the deployable evaluation, the merge, the banner and next-step lines, and what its numbers
describe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: reading a method's name or the auto rule costs no torch import
    import torch
    from torch import nn

# AdamW keeps two float32 states (exp_avg, exp_avg_sq) per trained weight, dense over the whole tensor.
ADAMW_STATE_BYTES = 8


class RecoverySettings(Protocol):
    """The settings a method reads (a `FinetuneConfig` has them all); methods never see an argparse namespace."""

    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: tuple[str, ...]
    sparse_ft_targets: tuple[str, ...]


@dataclass
class Prepared:
    """The trainable model of a method, the callbacks it needs and what it costs."""

    model: nn.Module
    method: str
    callbacks: list[Any]
    """TrainerCallbacks the Trainer runs (e.g. re-masking after every optimizer step)."""
    banner: dict[str, Any]
    """The `lora` record's method-specific fields (what trains, what it costs); `banner_lines` renders it."""
    state: Any = None
    """The method's own handle on what it trains (e.g. sparse-ft's weights and masks)."""
    held_bytes: Callable[[], dict[str, int]] | None = None
    """What the method holds on this process beyond the trained parameters and the optimizer state (sparse-ft:
    its keep-masks, a shard of each under FSDP2), measured when asked."""


@dataclass(frozen=True)
class Evaluation:
    """One pass of a method's deployable-evaluation policy."""

    key: str
    """`deployable`: the model a user deploys (always last, always present); `adapter`: a model that is not
    deployable but was trained (plain LoRA's dense update), reported beside it."""
    describes: str
    """What the perplexity of this pass is the perplexity of."""
    context: Callable[[nn.Module], AbstractContextManager[Any]] = field(default=lambda model: contextlib.nullcontext())
    """Entered around the pass: switches the model to what this pass measures."""


class RecoveryMethod(Protocol):
    name: str
    """The `--method` value."""
    summary: str
    """What trains, in a few words, for titles and banners ("sparse fine-tuning of the kept weights")."""
    result_dir: str
    """Where a finished run's result lives inside the run directory."""
    trains_base: bool
    """The base weights themselves train: they load in float32 (master weights) whatever the autocast dtype."""
    makes_adapter: bool
    """The result is a PEFT adapter that `merge` folds into the pruned model (else: a model directory)."""
    exact_merge: bool
    """A masked merge writes exactly the model that trained (the merged perplexity equals the unmerged one)."""
    checkpoint_weights: tuple[str, ...]
    """File names of a checkpoint's trained weights (one of them must be there for the checkpoint to count)."""

    def describes(self, deployable: bool = True) -> str:
        """What a perplexity of this method's fine-tuned model describes (`deployable=False`: as trained)."""
        ...

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], settings: RecoverySettings) -> Prepared:
        """Make `model` trainable (seed the RNG first: adapter inits draw from it)."""
        ...

    def evaluations(self) -> list[Evaluation]:
        """The deployable-evaluation policy: the passes a final evaluation runs, `deployable` last."""
        ...

    def load_checkpoint(self, model: nn.Module, checkpoint: Path) -> bool:
        """Load the trained weights of `checkpoint` into the prepared `model`; False when it holds none."""
        ...

    def save_result(self, trainer: Any, out_dir: Path, pruned_dir: Path, base_model: str | None,
                    record: dict[str, Any], base_digest: str, is_main: bool) -> None:
        """Write the run's result (`trainer.model`) into the empty `out_dir`, published whole by the caller; called
        on every rank (a sharded model gathers its state), files written by the main process."""
        ...

    def attach(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
        """Give a loaded adapter's LoRA layers the pruned pattern, so `evaluations()` can measure the deployable
        model without merging; the number of layers that got a mask (0 for methods without an adapter)."""
        ...

    def unmerged(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> AbstractContextManager[Any]:
        """Within the block, an adapter computes what it was trained as (the reference a merge is checked against)."""
        ...

    def banner_lines(self, record: dict[str, Any]) -> list[str]:
        """Console lines of the `lora` record (`Prepared.banner` + `total`): what trains, what it costs."""
        ...

    def next_steps(self, result: Path, pruned: Path, run_out: Path, data_flag: str) -> list[tuple[str, str]]:
        """(what, command) lines after a finished run."""
        ...


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
