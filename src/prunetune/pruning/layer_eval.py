"""`prune --eval`'s perplexity, one decoder layer resident at a time: the inputs of the first layer are captured
for the evaluation windows, run through every layer as the store holds it now (dense before the walk, pruned
after it), and the model's own head scores the last layer's outputs inside `prunetune.perplexity` (the decoder
stack replaced by a stand-in that hands them out). Each window meets the same operations in the same order as in
a whole-model forward, so the number is the whole model's (tests/test_prune_streaming.py), at the memory of one
layer and the windows' activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from prunetune.data import windows_of
from prunetune.perplexity import PerplexityResult, perplexity
from prunetune.pruning import calibration as cal
from prunetune.pruning.layer_store import LayerStore


class _Replay(nn.Module):
    """Decoder layer 0 during the head pass: returns the next rows of the last layer's stored outputs, as many
    as the batch it is called with (windows arrive in order)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple, self.next = hidden, as_tuple, 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        rows = self.hidden[self.next : self.next + hidden_states.shape[0]]
        self.next += hidden_states.shape[0]
        return (rows,) if self.as_tuple else rows


class _PassThrough(nn.Module):
    """Decoder layers 1.. during the head pass: the model still sees as many layers as it has."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@contextlib.contextmanager
def _replayed(store: LayerStore, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    stand_ins = [_Replay(hidden, as_tuple)] + [_PassThrough(as_tuple) for _ in store.layers[1:]]
    with cal.swapped_stack(store.model, store.prefix, nn.ModuleList(stand_ins)):
        yield


def _through_layers(store: LayerStore, inputs: cal.LayerInputs, device: str,
                    autocast: Callable[[], contextlib.AbstractContextManager],
                    on_layer: Callable[[int, int], None] | None) -> tuple[torch.Tensor, bool]:
    """The captured inputs through every layer as the store holds it now: (last layer's outputs, whether the
    layers return tuples)."""
    outs = torch.empty_like(inputs.hidden)
    as_tuple = False
    for i in range(len(store.layers)):
        layer = store.load(i, device)
        try:
            with autocast():
                cal.run_layer(layer, inputs, outs)
                if i == len(store.layers) - 1:  # what the model expects back from a layer
                    as_tuple = cal.returns_tuple(layer, inputs)
        finally:
            store.release(i, layer)
        inputs.hidden, outs = outs, inputs.hidden
        if on_layer is not None:
            on_layer(i + 1, len(store.layers))
    return inputs.hidden, as_tuple


def layerwise_perplexity(store: LayerStore, ids: torch.Tensor, seqlen: int, max_windows: int | None, device: str,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         on_layer: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity by the `prunetune.perplexity` protocol (batch 1), computed layer by layer. ValueError when
    the text holds no window."""
    windows = windows_of(ids, seqlen, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    store.load_outer(device)
    try:
        with autocast():
            inputs = cal.capture_first_layer_inputs(store.model, store.layers[0], windows, device)
        hidden, as_tuple = _through_layers(store, inputs, device, autocast, on_layer)
        with _replayed(store, hidden, as_tuple), autocast():
            return perplexity(store.model, ids, seqlen, max_windows=max_windows)
    finally:
        store.release_outer()


@torch.no_grad()
def layerwise_logits(store: LayerStore, ids: torch.Tensor, device: str) -> torch.Tensor:
    """The model's float32 logits on `ids` (1, T), layer by layer, in the weights' own dtype (no autocast): what
    `prune --permute` compares before and after relabelling."""
    store.load_outer(device)
    try:
        inputs = cal.capture_first_layer_inputs(store.model, store.layers[0], ids, device)
        hidden, as_tuple = _through_layers(store, inputs, device, contextlib.nullcontext, None)
        with _replayed(store, hidden, as_tuple):
            return store.model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    finally:
        store.release_outer()
