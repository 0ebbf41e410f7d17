"""Init time and peak memory of the data-driven initialisations: EVA, CorDA (IPM), LoRA-GA.

For each DT preset (random weights, the preset's dropout), the three run on the same random
windows (a quarter of them left-padded), each as the fine-tuning run does it: EVA and CorDA
forward the frozen model over real tokens (padding masked), LoRA-GA forwards and backwards
the DT's loss in train mode. EVA stops at convergence (tau), the others use every batch.
Peak memory is above what the process held just before the init: on the CPU the resident
set's high-water mark (freed memory handed back first with glibc's malloc_trim, the mark
reset through /proc/self/clear_refs; Linux), on CUDA torch's peak allocated bytes.
Methods run in a rotating order per repeat, after one untimed warm-up batch each; times
are medians.

    .venv/bin/python scripts/bench/bench_inits.py --presets small paper
    .venv/bin/python scripts/bench/bench_inits.py --presets small paper --device cuda
    # smoke run (the test suite's): --presets tiny --batches 2 --batch-size 4
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eva_rl.eva import EvaConfig, compute_eva, dt_forward_and_mask
from eva_rl.inits import CordaConfig, LoraGaConfig, compute_corda, compute_lora_ga
from eva_rl.models.dt import DecisionTransformer, DTConfig

from common import NOISY, median, random_dt_batch, set_threads, sync, torch_line

METHODS = ("eva", "corda_ipm", "lora_ga")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _release_free_memory() -> None:
    """Hand memory freed by earlier calls back to the OS (glibc keeps it otherwise, and a
    later call reusing it would show no growth of the resident set)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def measured(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None, object]:
    """(seconds, peak MiB above the start or None where unmeasurable, result) of ``fn()``."""
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _status_kib("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")  # high-water mark := current RSS
        except OSError:
            start = None
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        hwm = _status_kib("VmHWM")
        peak = None if start is None or hwm is None else (hwm - start) / 1024
    return seconds, peak, out


def runners(model: DecisionTransformer, batches: list[dict], args) -> dict[str, Callable]:
    """One zero-argument call per method, each on ``batches`` with the run's settings."""
    forward, mask_fn = dt_forward_and_mask(model)
    n = len(batches)
    return {
        "eva": lambda: compute_eva(model, batches, EvaConfig(rank=args.rank, rho=args.rho,
                                                             max_batches=n),
                                   forward=forward, mask_fn=mask_fn),
        "corda_ipm": lambda: compute_corda(model, batches,
                                           CordaConfig(mode="ipm", rank=args.rank, max_batches=n),
                                           forward=forward, mask_fn=mask_fn),
        "lora_ga": lambda: compute_lora_ga(model, batches,
                                           LoraGaConfig(rank=args.rank, max_batches=n),
                                           loss_fn=lambda m, b: m.loss(b)),
    }


def bench_preset(preset: str, args, device: torch.device) -> list[tuple]:
    torch.manual_seed(args.seed)
    model = DecisionTransformer(DTConfig.preset(preset)).to(device).eval()
    cfg = model.config
    batches = [{k: v.to(device) for k, v in
                random_dt_batch(cfg, args.batch_size, seed=args.seed + i, padded_share=0.25,
                                max_start=200).items()} for i in range(args.batches)]
    calls = runners(model, batches, args)
    warm = runners(model, batches[:1], args)
    for name in METHODS:  # first-call costs (allocator, kernels) outside the timings
        warm[name]()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    peaks: dict[str, list[float]] = {m: [] for m in METHODS}
    used: dict[str, int] = {}
    for r in range(args.repeats):
        for name in METHODS[r % 3:] + METHODS[:r % 3]:
            torch.manual_seed(args.seed)  # LoRA-GA's dropout
            seconds, peak, result = measured(calls[name], device)
            times[name].append(seconds)
            if peak is not None:
                peaks[name].append(peak)
            used[name] = result.batches_used
    n_params = sum(p.numel() for p in model.blocks.parameters())
    rows = []
    for name in METHODS:
        peak = max(peaks[name]) if peaks[name] else None
        rows.append((preset, n_params, name, used[name], median(times[name]), peak))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per batch "
                        "(the fine-tuning default eva_batch_size)")
    parser.add_argument("--batches", type=int, default=20, help="batches (EVA stops earlier "
                        "when converged)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's "
                        "default; on a loaded 2-core machine >1 made LAPACK's SVD 100x slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    set_threads(args.threads)
    # EVA warns when it stops at the cap before converging: the batches column shows it
    logging.getLogger("eva_rl.eva.core").setLevel(logging.ERROR)
    print(torch_line() + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    print(f"{NOISY}.")
    print(f"rank {args.rank} (EVA rho {args.rho}), {args.batches} batches of "
          f"{args.batch_size} random windows (25% left-padded), median of {args.repeats}")
    memory = "peak allocated" if device.type == "cuda" else "peak RSS"
    print(f"\n| preset | block params | method | batches | seconds | {memory} MiB above start |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for preset_name, n_params, name, used, seconds, peak in bench_preset(preset, args,
                                                                             device):
            mem = "n/a" if peak is None else f"{peak:.1f}"
            print(f"| {preset_name} | {n_params:,} | {name} | {used} | {seconds:.3f} | {mem} |",
                  flush=True)


if __name__ == "__main__":
    main()
