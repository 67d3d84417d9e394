"""Where `prune`'s decoder layers live between visits of the layer walk, behind one interface the phases use:

- `StreamedLayers`: on disk. The model is a skeleton (`skeleton.py`); a layer's weights are read from the
  checkpoint's shards when the walk reaches it, and once pruned they are written into the output shards (laid
  out in advance, byte for byte save_pretrained's) and freed. Embeddings, final norm and head (the "outer"
  weights) are loaded only for the passes that need them: the capture of the first layer's inputs and the head
  of a perplexity pass. A later visit of a pruned layer (the pruned-model perplexity) reads it back from the
  output, so what is measured is what was saved.
- `ResidentLayers`: in memory. The whole model was loaded (a checkpoint that cannot be streamed exactly); only
  the layer being worked on moves to the device.

`relabel` (prune --permute): from then on the model is seen with its channels relabelled. Resident: done in
place at once. Streamed: each layer as it is read from the checkpoint, the outer weights as they are loaded and
when `finish` writes them (which is why they are written at the end, not when the output opens).

Peak host memory when streamed: the outer weights or one layer (never both during the walk), plus the
calibration activations, plus the keep-masks packed to one bit per weight (or per tile).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from prunetune.architecture import find_decoder_layers
from prunetune.models import ModelRef, load_config, load_weights, local_files_only, weight_files
from prunetune.pruning import calibration as cal
from prunetune.pruning.skeleton import (
    SAFETENSORS_METADATA,
    Skeleton,
    build_skeleton,
    save_layout,
    write_config_files,
)
from prunetune.shards import ShardReader, ShardWriter


def _libc_trim():
    """glibc's `malloc_trim`, or None elsewhere. A freed layer's tensors (a few MiB each) sit below glibc's
    adaptive mmap threshold, so they go back to the heap, not to the system: without a trim the process kept
    ~10 MiB per visited layer (SmolLM2, 30 layers: +300 MiB, more than half the model)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc; a no-op elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)


OuterRelabel = Callable[[str, torch.Tensor], torch.Tensor]
"""A weight outside the decoder stack (by its state-dict name) -> the same weight relabelled (`prune --permute`)."""
LayerRelabel = Callable[[int, nn.Module], None]
"""Relabels decoder layer i in place (`prune --permute`)."""


class LayerStore(Protocol):
    model: nn.Module
    prefix: str
    layers: list[nn.Module]
    streamed: bool
    how: str
    """How the weights are held, for the console and prune.json ("streamed layer by layer from ...")."""

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as saved (tied weights once)."""
        ...

    def open_output(self, directory: Path) -> None:
        """The output directory exists: streamed weights can be written into it from now on."""
        ...

    def load_outer(self, device: str) -> None:
        """Embeddings, final norm, head... on `device` (the decoder stack stays where it is)."""
        ...

    def relabel(self, outer: OuterRelabel, layer: LayerRelabel) -> None:
        """From now on the model is read relabelled: the outer weights (as loaded and as saved) and every layer
        read from the checkpoint (a committed layer was relabelled before it was pruned)."""
        ...

    def release_outer(self) -> None:
        ...

    def load(self, i: int, device: str) -> nn.Module:
        """Decoder layer i with its weights as they are now (dense, or pruned once committed), on `device`."""
        ...

    def commit(self, i: int, layer: nn.Module) -> None:
        """Layer i is final (pruned): it is part of the saved model from now on."""
        ...

    def release(self, i: int, layer: nn.Module) -> None:
        """Done with layer i for now: its device memory (and, streamed, its host memory) is freed."""
        ...

    def finish(self, directory: Path) -> None:
        """Write the model (config and weights) into `directory`; every layer is committed."""
        ...

    def abort(self) -> None:
        """The run failed: release open files (the output directory is deleted by its staging)."""
        ...


class ResidentLayers:
    """The whole model in host memory; one layer at a time moves to the device."""

    streamed = False

    def __init__(self, model: nn.Module, prefix: str, layers: list[nn.Module], why: str) -> None:
        self.model, self.prefix, self.layers = model, prefix, layers
        self.how = f"the whole model in memory ({why})"

    def weight_bytes(self) -> int:
        return save_layout(self.model).nbytes

    def open_output(self, directory: Path) -> None:
        pass

    def load_outer(self, device: str) -> None:
        cal.move_except_layers(self.model, self.prefix, device)

    def relabel(self, outer: OuterRelabel, layer: LayerRelabel) -> None:
        stack = {id(p) for block in self.layers for p in block.parameters()}
        seen: set[int] = set()
        with torch.no_grad():
            for name, p in self.model.named_parameters(remove_duplicate=False):  # a tied head once
                if id(p) not in stack and id(p) not in seen:
                    seen.add(id(p))
                    p.data = outer(name, p.data)
        for i, block in enumerate(self.layers):
            layer(i, block)

    def release_outer(self) -> None:
        cal.move_except_layers(self.model, self.prefix, "cpu")

    def load(self, i: int, device: str) -> nn.Module:
        return self.layers[i].to(device)

    def commit(self, i: int, layer: nn.Module) -> None:
        pass

    def release(self, i: int, layer: nn.Module) -> None:
        layer.to("cpu")

    def finish(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def abort(self) -> None:
        pass


class StreamedLayers:
    """The model as a skeleton; every layer read from the checkpoint's shards when visited, written when final."""

    streamed = True

    def __init__(self, skeleton: Skeleton, prefix: str, layers: list[nn.Module], source: str) -> None:
        self.model, self.prefix, self.layers = skeleton.model, prefix, layers
        self.reader = skeleton.reader
        self.how = f"streamed layer by layer from {source}"
        self.layout = save_layout(self.model)
        self.dtypes = {name: t.dtype for name, t in self.model.state_dict().items()}
        stack = f"{prefix}."
        self.outer = sorted(n for n in self.layout.names if not n.startswith(stack))
        self.writer: ShardWriter | None = None
        self.output: ShardReader | None = None
        self.committed: set[int] = set()
        self.relabelled: tuple[OuterRelabel, LayerRelabel] | None = None

    def weight_bytes(self) -> int:
        return self.layout.nbytes

    def open_output(self, directory: Path) -> None:
        """Lay the output shards out (the outer weights are written by `finish`: --permute may relabel them)."""
        self.writer = ShardWriter(directory, self.layout.files, SAFETENSORS_METADATA)
        self.output = ShardReader(directory / name for name in self.layout.files)

    def _write_outer(self) -> None:
        assert self.writer is not None
        for name in self.outer:
            if self.relabelled is not None:
                self.writer.write(name, self._read_outer(name))
            elif self.reader.where[name].dtype == self.dtypes[name]:
                self.writer.copy(name, self.reader)  # byte for byte, a chunk at a time: no tensor held
            else:
                self.writer.write(name, self._read(self.reader, name))

    def _read_outer(self, name: str) -> torch.Tensor:
        tensor = self._read(self.reader, name)
        return self.relabelled[0](name, tensor).contiguous() if self.relabelled is not None else tensor

    def relabel(self, outer: OuterRelabel, layer: LayerRelabel) -> None:
        self.relabelled = (outer, layer)

    def _read(self, reader: ShardReader, name: str) -> torch.Tensor:
        tensor = reader.read(name)
        dtype = self.dtypes[name]
        # from_pretrained casts floating tensors to the model's dtype and leaves the others as stored
        return tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor

    def load_outer(self, device: str) -> None:
        tensors = {n: self._read_outer(n) for n in self.outer}
        self.model.load_state_dict(tensors, strict=False, assign=True)
        self.model.tie_weights()  # the head shares the new embedding tensor again (tied models)
        cal.move_except_layers(self.model, self.prefix, device)

    def release_outer(self) -> None:
        state = self.model.state_dict()
        self.model.load_state_dict({n: torch.empty_like(state[n], device="meta") for n in self.outer},
                                   strict=False, assign=True)
        self.model.tie_weights()
        return_freed_memory()

    def load(self, i: int, device: str) -> nn.Module:
        layer = self.layers[i]
        reader = self.output if i in self.committed else self.reader
        assert reader is not None, "a committed layer implies an open output"
        tensors = {rel: self._read(reader, f"{self.prefix}.{i}.{rel}").to(device) for rel in layer.state_dict()}
        layer.load_state_dict(tensors, strict=True, assign=True)
        if self.relabelled is not None and i not in self.committed:
            self.relabelled[1](i, layer)
        return layer

    def commit(self, i: int, layer: nn.Module) -> None:
        if self.writer is None:
            raise RuntimeError("the output was not opened before a layer was committed (a bug in prunetune)")
        for rel, tensor in layer.state_dict().items():
            self.writer.write(f"{self.prefix}.{i}.{rel}", tensor)
        self.committed.add(i)

    def release(self, i: int, layer: nn.Module) -> None:
        layer.load_state_dict({rel: torch.empty_like(t, device="meta") for rel, t in layer.state_dict().items()},
                              strict=True, assign=True)
        return_freed_memory()

    def finish(self, directory: Path) -> None:
        if self.writer is None:
            raise RuntimeError("the output was never opened (a bug in prunetune)")
        self._write_outer()
        self.writer.close()  # fails if a laid-out tensor was never written
        write_config_files(self.model, directory, self.layout)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def open_layers(ref: ModelRef, location: str, dtype: torch.dtype, stream: bool, log=print) -> LayerStore:
    """The model of `ref` (materialized at `location`) in `dtype`: streamed where that is exact, else whole."""
    why = "--no-stream"
    if stream:
        files, why = weight_files(ref, location)
        if files:
            skeleton = build_skeleton(load_config(ref, log=log), location, files, dtype, local_files_only(ref))
            if isinstance(skeleton, Skeleton):
                prefix, layers = find_decoder_layers(skeleton.model)
                where = files[0].parent if len(files) == 1 else f"{len(files)} shards in {files[0].parent}"
                return StreamedLayers(skeleton, prefix, list(layers), str(where))
            why = skeleton
    model = load_weights(ref, dtype, None, log)
    prefix, layers = find_decoder_layers(model)
    return ResidentLayers(model, prefix, list(layers), why)

