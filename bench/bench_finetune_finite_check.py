"""Cost of checking, after every optimizer step, that the LoRA weights are finite (what the NaN alert needs).

`MonitorCallback.on_step_end` checks each trainable tensor with its own `bool(torch.isfinite(p).all())`: one
reduction and, on CUDA, one host synchronisation per tensor (420 tensors for all-linear LoRA on SmolLM2-135M).
This times that against fused checks with a single synchronisation, on SmolLM2-135M's LoRA shapes.

    .venv/bin/python bench/bench_finetune_finite_check.py [--device cuda] [--rank 16] [--targets all]
Writes its section of bench/RESULTS.md (`--no-write` only prints).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from results import machine_line, write_section

# SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads x 64, 30 layers.
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def lora_params(rank: int, targets: list[str], layers: int, device: str) -> list[torch.Tensor]:
    params = []
    for _ in range(layers):
        for t in targets:
            out_f, in_f = SHAPES[t]
            params += [torch.randn(rank, in_f, device=device), torch.randn(out_f, rank, device=device)]
    return params


def per_tensor(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def stacked(params: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def foreach_norm(params: list[torch.Tensor]) -> bool:
    # A NaN or Inf anywhere makes that tensor's norm non-finite: one fused kernel set, one sync.
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())


def time_it(fn, params, device: str, repeats: int) -> float:
    fn(params)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(params)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all", help="all | comma list, e.g. q_proj,v_proj")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    targets = list(SHAPES) if args.targets == "all" else args.targets.split(",")
    params = lora_params(args.rank, targets, 30, args.device)
    broken = [t.clone() for t in params]
    broken[-1][0, 0] = float("nan")
    for fn in (per_tensor, stacked, foreach_norm):
        assert fn(params) and not fn(broken), fn.__name__
    rows = [f"| {fn.__name__} | {time_it(fn, params, args.device, args.repeats):.3f} |"
            for fn in (per_tensor, stacked, foreach_norm)]
    body = f"""{machine_line()}

{len(params)} LoRA tensors (r={args.rank}, {','.join(targets)}; SmolLM2-135M shapes, 30 layers), device
{args.device}, median of {args.repeats} calls. `per_tensor` is what `MonitorCallback.on_step_end` does after every
optimizer step (one reduction and, on CUDA, one host sync per tensor); `foreach_norm` is one fused
`torch._foreach_norm` + one sync, and catches the same NaN/Inf.

| check | ms per step |
|---|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        name = f"finetune-finite-check-{args.device}-{'all' if args.targets == 'all' else 'qv'}-r{args.rank}"
        write_section(name, f"Fine-tuning: cost of the per-step finite-weights check ({args.device}, "
                            f"{args.targets}, r={args.rank})", body)


if __name__ == "__main__":
    main()
