"""Forward+backward time of adapted Decision Transformers: our adapters vs PEFT's.

For each DT preset, one training step (forward, MSE loss, backward; no optimiser step) is
timed for: the frozen base (gradients flow to the input only: the floor of any adapter
method), full fine-tuning, and LoRA / DoRA / PiSSA on every block linear, ours
(`eva_rl.adapters`) and PEFT's (`peft.inject_adapter_in_model`) on copies of the same
model. All variants are timed interleaved, in a rotating order, each repeat; the table
gives the median ms per step, the ratio to the frozen base, ours / PEFT, and DoRA's
overhead over LoRA for both implementations.

With `--adalora`, a whole update is timed instead (forward, backward, AdamW step, as the
Trainer does it): LoRA at `--rank`, AdaLoRA at the same rank without its allocator, and
AdaLoRA from 1.5x `--rank` down to `--rank` with the orthogonality regulariser in the loss
and `AdaLoraAllocator.update` after every optimizer step (masking at every step: delta_t 1,
the allocator's most expensive setting); printed as ms/update and the ratio to LoRA.

    .venv/bin/python scripts/bench/bench_adapters.py --presets small paper --repeats 5
    .venv/bin/python scripts/bench/bench_adapters.py --presets small --adalora --repeats 7
    # smoke run (the test suite's): --presets tiny --repeats 1 --iters 1
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eva_rl.adapters import (
    AdaLoraAllocator,
    AdaLoraSchedule,
    AdapterConfig,
    add_adapter,
    count_parameters,
)
from eva_rl.models.dt import DecisionTransformer, DTConfig
from eva_rl.training.trainer import TrainConfig, build_optimizer

from common import interleaved, median, random_dt_batch, set_threads, torch_line

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]
METHODS = ("lora", "dora", "pissa")
DEFAULT_BATCH = {"tiny": 64, "small": 32, "paper": 4}  # paper: 4 x 200 tokens, CPU-sized


def make_batch(cfg: DTConfig, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A random batch of full windows; states require grad (see module doc)."""
    batch = random_dt_batch(cfg, batch_size, seed)
    batch["states"].requires_grad_(True)
    return batch


def peft_model(base: nn.Module, method: str, rank: int, alpha: float) -> nn.Module:
    import peft

    init = "pissa" if method == "pissa" else True
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS, use_dora=method == "dora",
        init_lora_weights=init,
    )
    model = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def build_variants(
    base: DecisionTransformer, rank: int, alpha: float, with_peft: bool
) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {}
    frozen = copy.deepcopy(base).requires_grad_(False)
    variants["frozen base"] = frozen
    variants["fft"] = copy.deepcopy(base).requires_grad_(True)
    for method in METHODS:
        ours = copy.deepcopy(base)
        add_adapter(ours, method, AdapterConfig(method=method, rank=rank, alpha=alpha))
        variants[f"ours {method}"] = ours
        if with_peft:
            variants[f"peft {method}"] = peft_model(base, method, rank, alpha)
    for model in variants.values():
        model.train()
    return variants


def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    batch["states"].grad = None
    model.zero_grad(set_to_none=True)
    model.loss(batch).backward()


def time_variants(
    variants: dict[str, Any], batch: dict[str, torch.Tensor], repeats: int, iters: int,
    run: Callable[[Any, dict[str, torch.Tensor]], None] = step,
) -> dict[str, list[float]]:
    """Per-repeat mean ms per `run(variant, batch)` of every variant, interleaved in a
    rotating order."""
    fns = {name: lambda v=v: [run(v, batch) for _ in range(iters)]
           for name, v in variants.items()}
    wall, _ = interleaved(fns, repeats)
    return {name: [t / iters * 1e3 for t in ts] for name, ts in wall.items()}


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of time(a) / time(b) measured in the same repeat."""
    return median(x / y for x, y in zip(times[a], times[b], strict=True))


def report(preset: str, variants: dict[str, nn.Module], times: dict[str, list[float]]) -> None:
    """Print medians and paired (same-repeat) ratios."""
    med = {n: median(t) for n, t in times.items()}
    print(f"\n## preset {preset}  (ratios: medians of same-repeat ratios)")
    print(f"{'variant':<12} {'trainable':>10} {'ms/step':>8} {'min-max ms':>15} {'/base':>6} "
          f"{'ours/peft':>9}")
    for name, m in med.items():
        n_train = sum(p.numel() for p in variants[name].parameters() if p.requires_grad)
        peer = name.replace("ours", "peft")
        vs = f"{paired(times, name, peer):9.2f}" if name.startswith("ours") and peer in med else ""
        lo, hi = min(times[name]), max(times[name])
        print(f"{name:<12} {n_train:>10,} {m:8.1f} {lo:7.1f}-{hi:<7.1f} "
              f"{paired(times, name, 'frozen base'):6.2f} {vs}")
    for impl in ("ours", "peft"):
        if f"{impl} dora" in med:
            extra = median(
                d - lo for d, lo in zip(times[f"{impl} dora"], times[f"{impl} lora"], strict=True)
            )
            print(f"DoRA over LoRA, {impl}: x{paired(times, f'{impl} dora', f'{impl} lora'):.3f}"
                  f" ({extra:+.1f} ms/step)")


class Updater:
    """One full training update of `model` (AdamW); with `allocator`, AdaLoRA's too."""

    def __init__(self, model: nn.Module, allocator: AdaLoraAllocator | None = None) -> None:
        self.model = model.train()
        self.allocator = allocator
        self.optimizer = build_optimizer(model, TrainConfig())
        self.step = 0
        self.allocator_s = 0.0

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model.loss(batch)
        if self.allocator is not None:
            loss = loss + self.allocator.orthogonal_loss()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        if self.allocator is not None:
            t0 = time.perf_counter()
            self.allocator.update(self.step)
            self.allocator_s += time.perf_counter() - t0


def adalora_updaters(base: DecisionTransformer, rank: int, alpha: float) -> dict[str, Updater]:
    """LoRA r, AdaLoRA r (no allocator), AdaLoRA 1.5r -> r with its allocator."""
    init_rank = max(rank + 1, round(1.5 * rank))
    updaters = {}
    lora = copy.deepcopy(base)
    add_adapter(lora, "t", AdapterConfig(method="lora", rank=rank, alpha=alpha))
    updaters[f"lora r{rank}"] = Updater(lora)
    plain = copy.deepcopy(base)
    add_adapter(plain, "t", AdapterConfig(method="adalora", rank=rank, alpha=alpha))
    updaters[f"adalora r{rank}, no allocator"] = Updater(plain)
    full = copy.deepcopy(base)
    add_adapter(full, "t", AdapterConfig(method="adalora", rank=init_rank, alpha=alpha))
    schedule = AdaLoraSchedule(total_steps=10**9, target_rank=rank)  # always budget phase
    updaters[f"adalora r{init_rank}->{rank}"] = Updater(full, AdaLoraAllocator(full, "t", schedule))
    return updaters


def bench_adalora(preset: str, base: DecisionTransformer, batch: dict[str, torch.Tensor],
                  args: argparse.Namespace) -> None:
    """Time whole updates of LoRA and AdaLoRA side by side; print ms/update and ratios."""
    updaters = adalora_updaters(base, args.rank, args.alpha)
    batch = {k: v.detach() for k, v in batch.items()}
    times = time_variants(updaters, batch, args.repeats, args.iters, run=lambda u, b: u(b))
    names = list(updaters)
    print(f"\n## preset {preset}: one update = forward + backward + AdamW step "
          "(+ orthogonality loss and allocator update for AdaLoRA)")
    print(f"{'variant':<28} {'params':>8} {'ms/update':>9} {'min-max ms':>15} {'/lora':>6} "
          f"{'allocator ms':>12}")
    for name in names:
        u = updaters[name]
        med = median(times[name])
        alloc = f"{u.allocator_s / u.step * 1e3:12.2f}" if u.allocator is not None else ""
        print(f"{name:<28} {count_parameters(u.model, 't'):>8,} {med:9.1f} "
              f"{min(times[name]):7.1f}-{max(times[name]):<7.1f} "
              f"{paired(times, name, names[0]):6.2f} {alloc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default per preset: {DEFAULT_BATCH})")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2, help="steps per timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 is steadiest on a shared box)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--adalora", action="store_true",
                        help="time whole updates of LoRA vs AdaLoRA (see the module doc)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    what = "whole updates" if args.adalora else "fwd+bwd, no optimiser step"
    print(f"{torch_line()}; medians of {args.repeats} interleaved repeats x {args.iters} steps; "
          f"{what}")
    for preset in args.presets:
        torch.manual_seed(args.seed)
        cfg = DTConfig.preset(preset, dropout=0.0)
        base = DecisionTransformer(cfg)
        batch_size = args.batch or DEFAULT_BATCH.get(preset, 8)
        batch = make_batch(cfg, batch_size, args.seed)
        if args.adalora:
            print(f"\npreset {preset}: {cfg.n_layer} layers x {cfg.n_embd}, batch {batch_size} "
                  f"x {cfg.context_len} steps, rank {args.rank}")
            bench_adalora(preset, base, batch, args)
            continue
        variants = build_variants(base, args.rank, args.alpha, not args.no_peft)
        print(f"\npreset {preset}: {cfg.n_layer} layers x {cfg.n_embd}, "
              f"{base.num_parameters():,} params, batch {batch_size} x {cfg.context_len} steps "
              f"({cfg.context_len * cfg.n_tokens} tokens), rank {args.rank}; ours lora has "
              f"{count_parameters(variants['ours lora'], 'lora'):,} adapter params")
        times = time_variants(variants, batch, args.repeats, args.iters)
        report(preset, variants, times)


if __name__ == "__main__":
    main()
