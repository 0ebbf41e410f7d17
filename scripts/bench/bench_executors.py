r"""Local vs Ray executor on one machine: wall time of an 8-cell experiment, Ray's own
overhead per cell, and the driver's peak memory.

The experiment: `single` protocol, lora and eva x faucet-close and window-close x seeds 0
and 1 (8 independent cells) on the quickstart's tiny DT. Each executor runs in a fresh
child process (so each driver's peak memory is its own), one after the other.

    python scripts/quickstart.py                      # makes runs/quickstart/{data,pretrain}
    python scripts/bench/bench_executors.py --quickstart runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("faucet-close-v3", "window-close-v3")
METHODS = ("lora", "eva")
SEEDS = (0, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quickstart", default="runs/quickstart",
                   help="a finished quickstart directory (its data/ and pretrain/)")
    p.add_argument("--data", help="dataset root (default: QUICKSTART/data)")
    p.add_argument("--pretrained", help="pretraining run (default: QUICKSTART/pretrain)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning updates per cell")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--dispatch-tasks", type=int, default=20,
                   help="no-op Ray tasks timed for the dispatch latency")
    p.add_argument("--child", choices=("local", "ray", "overhead"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child_experiment(args: argparse.Namespace) -> dict:
    import torch

    from agents.executors import LocalExecutor, RayExecutor
    from agents.finetune_config import get_config
    from agents.protocols import Experiment, run_experiment

    torch.set_num_threads(1)
    config = get_config("quick").replace(steps=args.steps, eval_episodes=args.eval_episodes,
                                         max_episode_steps=args.max_episode_steps,
                                         device="cpu", progress=False)
    exp = Experiment(pretrained=args.pretrained, data=args.data, tasks=TASKS, methods=METHODS,
                     seeds=SEEDS, protocol="single", config=config)
    executor = RayExecutor() if args.child == "ray" else LocalExecutor()
    t0 = time.perf_counter()
    results = run_experiment(exp, args.out, report=False, executor=executor)
    wall = time.perf_counter() - t0
    cell_seconds = [rec["finetune_seconds"] for run in results["runs"] for rec in run["per_task"]]
    return {"wall_s": wall, "cells": len(cell_seconds), "cell_seconds": cell_seconds,
            "driver_peak_mib": peak_rss_mib()}


def _noop() -> float:
    return time.time()


def _import_cell_code() -> float:
    t0 = time.perf_counter()
    import agents.protocols  # noqa: F401  (what a cell's worker imports first)

    return time.perf_counter() - t0


def run_child_overhead(args: argparse.Namespace) -> dict:
    """Ray's start-up (init, a worker's cold start with our imports) and warm dispatch."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    init_s = time.perf_counter() - t0
    workers = int(ray.cluster_resources().get("CPU", 1))
    cold = ray.remote(num_cpus=1)(_import_cell_code)
    t0 = time.perf_counter()
    import_s = ray.get([cold.remote() for _ in range(workers)])
    cold_s = time.perf_counter() - t0  # worker processes started in parallel + imports
    noop = ray.remote(num_cpus=1)(_noop)
    ray.get([noop.remote() for _ in range(workers)])
    rounds = []
    for _ in range(args.dispatch_tasks):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        rounds.append(time.perf_counter() - t0)
    ray.shutdown()
    return {"init_s": init_s, "workers": workers, "cold_start_s": cold_s,
            "import_s": statistics.median(import_s), "dispatch_s": statistics.median(rounds)}


def child(args: argparse.Namespace) -> None:
    result = run_child_overhead(args) if args.child == "overhead" else run_child_experiment(args)
    print(json.dumps(result))


def spawn(args: argparse.Namespace, kind: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", args.data, "--pretrained",
           args.pretrained, "--steps", str(args.steps), "--eval-episodes",
           str(args.eval_episodes), "--max-episode-steps", str(args.max_episode_steps),
           "--dispatch-tasks", str(args.dispatch_tasks),
           "--out", str(out / kind)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    qs = Path(args.quickstart)
    args.data = str(Path(args.data or qs / "data").resolve())
    args.pretrained = str(Path(args.pretrained or qs / "pretrain").resolve())
    if args.child:
        child(args)
        return 0
    if not (Path(args.pretrained) / "model.safetensors").is_file():
        print(f"error: no pretrained model in {args.pretrained}; run scripts/quickstart.py "
              "first or pass --data and --pretrained", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_executors_") as tmp:
        local = spawn(args, "local", Path(tmp))
        on_ray = spawn(args, "ray", Path(tmp))
        over = spawn(args, "overhead", Path(tmp))
    n = local["cells"]
    per_cell = (over["init_s"] + over["cold_start_s"]) / n + over["dispatch_s"]
    print(f"{n}-cell experiment (single: {', '.join(METHODS)} x {len(TASKS)} tasks x seeds "
          f"{SEEDS}, {args.steps} updates, {args.eval_episodes} eval episodes per point)")
    print(f"  local executor: {local['wall_s']:7.1f} s   driver peak "
          f"{local['driver_peak_mib']:6.0f} MiB   median cell "
          f"{statistics.median(local['cell_seconds']):.1f} s")
    print(f"  Ray executor:   {on_ray['wall_s']:7.1f} s   driver peak "
          f"{on_ray['driver_peak_mib']:6.0f} MiB   median cell "
          f"{statistics.median(on_ray['cell_seconds']):.1f} s "
          f"({over['workers']} cells at a time)")
    print(f"  speed-up with Ray: {local['wall_s'] / on_ray['wall_s']:.2f}x (goal >= 1.7x)")
    print(f"  Ray overhead: init {over['init_s']:.2f} s, {over['workers']} workers' cold start "
          f"{over['cold_start_s']:.2f} s (our imports {over['import_s']:.2f} s of it), warm "
          f"dispatch {over['dispatch_s'] * 1e3:.1f} ms per task")
    print(f"  -> Ray's own overhead per cell: {per_cell:.2f} s (goal <= 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
