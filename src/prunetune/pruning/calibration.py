"""Model walking for calibration, model-agnostic: draw windows, capture the first decoder layer's inputs (the
hidden states and every keyword argument the model passes its layers: attention mask, position embeddings, ...),
then run one layer at a time with hooks on its linear modules.

Memory: the decoder layers stay where the model is (CPU); only the layer being pruned moves to the device.
The calibration activations of one layer boundary are resident, as (inputs, outputs) buffers that swap roles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunetune.pruning.sparsegpt import hessian_update


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(N,) token stream -> (nsamples, seqlen) windows at random starts drawn with `seed` (Wanda's wikitext
    loader does the same; windows may overlap). ValueError if the stream is not longer than `seqlen`."""
    if tokens.numel() <= seqlen:
        raise ValueError(f"{tokens.numel()} tokens is not more than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def windows_hash(windows: torch.Tensor) -> str:
    """sha256 of the exact calibration token ids: two runs calibrated on the same data have the same hash."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@contextmanager
def swapped_stack(model: nn.Module, prefix: str, stand_in: nn.ModuleList) -> Iterator[None]:
    """Within the block, the decoder stack at `prefix` is `stand_in` (the real one is put back after)."""
    parent, attr = _parent(model, prefix)
    layers = getattr(parent, attr)
    setattr(parent, attr, stand_in)
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def move_except_layers(model: nn.Module, prefix: str, device: torch.device | str) -> None:
    """Move embeddings, norms, rotary tables, lm_head... to `device`, leaving the decoder stack where it is.

    The stack is detached while `model.to` runs, so tied weights stay tied and no family-specific names are needed.
    """
    with swapped_stack(model, prefix, nn.ModuleList()):
        model.to(device)


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are stored."""


@dataclass
class LayerInputs:
    """Calibration activations at one layer boundary plus the call arguments every layer receives."""

    hidden: torch.Tensor
    """(nsamples, seqlen, hidden) in the model dtype, on the device."""
    args: tuple[Any, ...] = ()
    """Positional arguments after the hidden states (rare; kept so any family works)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """attention_mask, position_ids, position_embeddings, ... exactly as the model passed them (windows have equal
    length and no padding, so these are the same for every window; captured from the first)."""


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, device: torch.device | str
) -> LayerInputs:
    """Run the model on each window until layer 0 is called; keep what it was called with.

    Everything outside the decoder stack must already be on `device` (see `move_except_layers`).
    """
    store: dict[str, Any] = {}
    hidden: torch.Tensor | None = None

    def hook(module, args, kwargs):
        nonlocal hidden
        hs = args[0] if args else kwargs["hidden_states"]
        if hidden is None:
            hidden = torch.empty((windows.shape[0], *hs.shape[1:]), dtype=hs.dtype, device=hs.device)
            store["args"] = tuple(args[1:])
            store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden[store["index"]] = hs[0]
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(windows.shape[0]):
            store["index"] = i
            with suppress(_Captured):
                model(input_ids=windows[i : i + 1].to(device), use_cache=False)
    finally:
        handle.remove()
    if hidden is None:
        raise RuntimeError("the first decoder layer was never called; cannot capture calibration inputs")
    return LayerInputs(hidden, store["args"], store["kwargs"])


def _first(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (Transformers 5) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_output(layer: nn.Module, inputs: LayerInputs, j: int) -> torch.Tensor:
    """`layer` on calibration window j: (1, seqlen, hidden); differentiable (block-wise reconstruction)."""
    return _first(layer(inputs.hidden[j : j + 1], *inputs.args, **inputs.kwargs))


@torch.no_grad()
def returns_tuple(layer: nn.Module, inputs: LayerInputs) -> bool:
    """Whether `layer` returns a tuple (older Transformers) rather than the hidden states (Transformers 5)."""
    return isinstance(layer(inputs.hidden[:1], *inputs.args, **inputs.kwargs), (tuple, list))


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, out: torch.Tensor) -> torch.Tensor:
    """Forward every calibration window through `layer`, one at a time, writing into `out` (same shape)."""
    for j in range(inputs.hidden.shape[0]):
        out[j] = layer_output(layer, inputs, j)[0]
    return out


class InputStats:
    """Per-linear input statistics gathered by forward hooks, float32 on the layer's device.

    With `hessian`, H = mean over tokens of x x^T (in, in); its diagonal also gives Wanda's column norms.
    Without, only sum over tokens of x_j^2 (in,), which is all Wanda needs.
    Modules fed the very same tensor (q/k/v, gate/up) share one accumulator: found on the first call by object
    identity, never by name, so any family's fused or split projections work.
    The hooks run before each module (forward pre-hooks): with `stop_when_complete` (see `gather_stats`), the
    forward is cut off once every module has seen the current window, so the modules after the last hooked
    input never run.
    """

    def __init__(self, modules: dict[str, nn.Linear], hessian: bool):
        self.hessian = hessian
        self.stop_when_complete = False
        self.window_calls: list[str] = []  # the hooked modules called so far in the current window, in order
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.shared_with: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # the last input accumulated, kept alive so `is` is safe
        self._handles = []
        for name, module in modules.items():
            self.counts[name] = 0
            dev = module.weight.device
            if hessian:
                self.hessians[name] = torch.zeros(module.in_features, module.in_features, device=dev)
            else:
                self.sq_norms[name] = torch.zeros(module.in_features, device=dev)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args):
            # Statistics are float32 sums over up to millions of tokens: never under the forward's autocast.
            with torch.autocast(args[0].device.type, enabled=False):
                accumulate(args)
            self.window_calls.append(name)
            if self.stop_when_complete and len(set(self.window_calls)) == len(self.counts):
                raise _StatsComplete

        def accumulate(args):
            x = args[0]
            if name in self.shared_with:
                return
            if self.counts[name] == 0 and self._last is not None and x is self._last[0]:
                owner = self._last[1]
                self.shared_with[name] = owner
                store = self.hessians if self.hessian else self.sq_norms
                store[name] = store[owner]
                return
            x = x.detach()
            if self.hessian:
                self.counts[name] = hessian_update(self.hessians[name], self.counts[name], x)
            else:
                flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
                self.sq_norms[name] += flat.pow(2).sum(0)
                self.counts[name] += flat.shape[0]
            self._last = (args[0], name)
        return hook

    def col_sq_norms(self, name: str) -> torch.Tensor:
        """Wanda's ||x_j||^2 up to a constant factor (which changes no ranking)."""
        return torch.diag(self.hessians[name]) if self.hessian else self.sq_norms[name]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None


@contextmanager
def collecting(modules: dict[str, nn.Linear], hessian: bool) -> Iterator[InputStats]:
    stats = InputStats(modules, hessian)
    try:
        yield stats
    finally:
        stats.remove()


class _StatsComplete(Exception):
    """Raised by `InputStats` once every hooked module has seen the current window's input."""


@torch.no_grad()
def gather_stats(layer: nn.Module, inputs: LayerInputs, stats: InputStats) -> None:
    """Feed every calibration window to `stats` without computing more of the layer than the statistics need:
    each window's forward stops as soon as the last hooked module has its input (in a Llama layer, before
    down_proj and the MLP residual). For the sequential walk, whose next-layer inputs come from the pruned layer
    anyway. The first window runs whole; only if it called every hooked module exactly once are later windows cut
    (a module called twice, or a mixture-of-experts layer that skips some, always runs whole)."""
    try:
        for j in range(inputs.hidden.shape[0]):
            stats.window_calls = []
            with suppress(_StatsComplete):
                layer_output(layer, inputs, j)
            if j == 0:
                calls = stats.window_calls
                stats.stop_when_complete = len(calls) == len(set(calls)) == len(stats.counts)
    finally:
        stats.stop_when_complete = False
