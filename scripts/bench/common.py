"""What the benchmark scripts share: timing (synchronised, interleaved, medians), a random
Decision Transformer batch, torch threads and the header line.

The scripts import it as ``from common import ...`` (scripts/bench is the script's own
directory, so it is on ``sys.path`` when a script runs; the test suite adds it too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch

T = TypeVar("T")

NOISY = "numbers from a shared, noisy machine; other jobs ran at the same time"


def median(values: Iterable[float]) -> float:
    """The median (``statistics.median``) of any iterable."""
    return statistics.median(list(values))


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued kernels (CUDA timings are asynchronous otherwise)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[float, T]:
    """(wall seconds, result) of one call of ``fn``, synchronised on ``device``."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None
                ) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``."""
    return median(timed(fn, device)[0] for _ in range(repeats))


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: bool = True
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each function per repeat, called in a rotating order
    (each repeat starts one later), so a slow phase of a shared machine hits all alike.
    With ``warmup`` every function runs once, untimed, first."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def random_dt_batch(cfg: Any, batch_size: int, seed: int = 0, padded_share: float = 0.0,
                    max_start: int | None = None) -> dict[str, torch.Tensor]:
    """A random sampler-like batch for a `DecisionTransformer` of config ``cfg``.

    ``padded_share`` of the windows are left-padded to a random length; window starts are
    uniform in ``[0, max_start - K)`` (default ``cfg.max_ep_len``)."""
    g = torch.Generator().manual_seed(seed)
    B, K = batch_size, cfg.context_len
    mask = torch.ones(B, K, dtype=torch.bool)
    lengths = torch.randint(1, K + 1, (int(B * padded_share),), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, : K - n] = False
    top = (cfg.max_ep_len if max_start is None else max_start) - K
    return {
        "states": torch.randn(B, K, cfg.state_dim, generator=g),
        "actions": torch.rand(B, K, cfg.act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(B, K, 1, generator=g),
        "returns_to_go": torch.randn(B, K, 1, generator=g),
        "timesteps": torch.randint(0, top, (B, 1), generator=g) + torch.arange(K),
        "mask": mask,
    }


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` unless ``n`` is None or 0 (torch's default)."""
    if n:
        torch.set_num_threads(n)


def torch_line() -> str:
    """torch version, threads and CPU capability: the first line of every report."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")
