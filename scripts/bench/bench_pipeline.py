r"""Wall-clock, peak memory and time shares of the quickstart and of `cpu` CW10 runs.

Each measured run is a fresh subprocess (so its peak RSS is its own, read with `wait4`).
Method runs are interleaved over the repeats (lora, eva, eva_dora, lora, ...) so machine
noise hits them alike; medians are printed with ratios against the peer method (default
`lora`). Time shares come from the runs' own records: env stepping while collecting, model
training (pretraining, fine-tuning updates), evaluation (success curves and matrix rows)
and EVA init. ``--profile-eval`` splits one evaluation into env stepping and model forward.

Example:
    python scripts/bench/bench_pipeline.py quickstart --out /tmp/bench-qs
    python scripts/bench/bench_pipeline.py cw10 --pretrained runs/pretrain-small \
        --data data/cw10 --methods lora,eva,eva_dora --repeats 1 --out /tmp/bench-cw10
    # smoke run (the test suite's): one tiny task, 2 updates, 1 short evaluation episode
    python scripts/bench/bench_pipeline.py cw10 --pretrained PRE --data DATA --tasks reach \
        --methods lora --config quick --steps 2 --eval-episodes 1 --max-episode-steps 10 \
        --out /tmp/bench-smoke
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import NOISY, median

ROOT = Path(__file__).resolve().parents[2]


def run_child(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB of the child and its waited-for descendants, exit code)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # this checkout's packages, whatever an installed copy says
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0, proc.returncode


def shares_from_results(results: dict) -> dict[str, float]:
    """Seconds per phase summed over every task record of a results dict."""
    out = {"train": 0.0, "eval": 0.0, "eva_init": 0.0}
    for run in results["runs"]:
        for rec in run["per_task"]:
            out["train"] += rec["train_seconds"]
            out["eval"] += rec["eval_seconds"] + rec.get("row_eval_seconds", 0.0)
            out["eva_init"] += rec["eva_seconds"]
    return out


def fmt_shares(parts: dict[str, float], wall: float) -> str:
    return ", ".join(f"{k} {v:.1f} s ({100 * v / wall:.0f}%)" for k, v in parts.items())


def bench_quickstart(args: argparse.Namespace) -> None:
    walls, rss = [], []
    for r in range(args.repeats):
        out = Path(args.out) / f"quickstart-{r}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--out", str(out),
               "--no-progress"]
        wall, peak, code = run_child(cmd, Path(args.out) / f"quickstart-{r}.log")
        if code:
            raise SystemExit(f"quickstart failed (exit {code}); see {args.out}/quickstart-{r}.log")
        walls.append(wall)
        rss.append(peak)
        times = json.loads((out / "timings.json").read_text())
        results = json.loads((out / "finetune" / "results.json").read_text())
        parts = {"collect (env stepping + experts)": times["collect"],
                 "pretrain (training)": times["pretrain"], **shares_from_results(results)}
        print(f"quickstart run {r}: {wall:.0f} s wall, peak RSS {peak:.0f} MiB; "
              f"{fmt_shares(parts, wall)}")
        rerun, _, code = run_child(cmd, Path(args.out) / f"quickstart-{r}-rerun.log")
        print(f"quickstart re-run on the finished directory: {rerun:.1f} s (exit {code})")
    print(f"quickstart median: {median(walls):.0f} s wall, "
          f"{median(rss):.0f} MiB peak RSS over {len(walls)} run(s)")
    if args.profile_eval:
        profile_eval(Path(args.out) / "quickstart-0" / "pretrain",
                     Path(args.out) / "quickstart-0" / "data", "faucet-close-v3")


def bench_cw10(args: argparse.Namespace) -> None:
    methods = args.methods.split(",")
    rows: dict[str, list[tuple[float, float, dict]]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in methods:  # interleaved
            out = Path(args.out) / f"{m}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--pretrained",
                   args.pretrained, "--data", args.data, "--protocol", "single", "--methods",
                   m, "--tasks", args.tasks, "--seeds", "0", "--config", args.config, "--out",
                   str(out), "--no-progress"]
            for flag in ("steps", "eval_episodes", "max_episode_steps"):  # overrides given
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            wall, peak, code = run_child(cmd, Path(args.out) / f"{m}-{r}.log")
            if code:
                raise SystemExit(f"{m} failed (exit {code}); see {args.out}/{m}-{r}.log")
            results = json.loads((out / "results.json").read_text())
            parts = shares_from_results(results)
            succ = [rec["success"] for rec in results["runs"][0]["per_task"]]
            rows[m].append((wall, peak, parts))
            print(f"{m} run {r}: {wall:.0f} s wall, peak RSS {peak:.0f} MiB, avg success "
                  f"{sum(succ) / len(succ):.2f}; {fmt_shares(parts, wall)}")
    peer = args.peer if args.peer in rows else methods[0]
    base = median(w for w, _, _ in rows[peer])
    print(f"\nmedians over {args.repeats} repeat(s), tasks {args.tasks}, config {args.config}:")
    for m, runs in rows.items():
        wall = median(w for w, _, _ in runs)
        peak = median(p for _, p, _ in runs)
        eva = median(p["eva_init"] for _, _, p in runs)
        print(f"  {m:<10} {wall:7.0f} s ({wall / base:.2f}x {peer}), peak RSS {peak:.0f} MiB, "
              f"EVA init {eva:.1f} s ({100 * eva / wall:.1f}%)")


def profile_eval(pretrained: Path, data: Path, task: str) -> None:
    """Split one 10-episode evaluation into env stepping and model forward (cProfile)."""
    import torch

    from agents.dt_agent import DTAgent
    from agents.evaluation import evaluate
    from eva_rl.data import open_dataset

    torch.set_num_threads(1)
    agent = DTAgent.load(pretrained, device="cpu")
    agent.target_returns[task] = float(open_dataset(data / task).episode_returns.max())
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    evaluate(agent, [task], n_episodes=10, seed=0, progress=False)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats
    def cum(fragment: str, name: str) -> float:
        return max((v[3] for (file, _, fn), v in stats.items()
                    if fragment in file and fn == name), default=0.0)
    env = cum("gymnasium/vector/sync_vector_env", "step")
    make = cum("envs/factory", "make_vec_env")
    model = cum("eva_rl/models/inference", "next_actions")
    print(f"one evaluation (10 episodes x 200 steps, {task}): {wall:.1f} s under cProfile; "
          f"env stepping {env:.1f} s ({100 * env / wall:.0f}%), env creation {make:.1f} s "
          f"({100 * make / wall:.0f}%), model forward {model:.1f} s ({100 * model / wall:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["quickstart", "cw10"])
    p.add_argument("--out", required=True, help="scratch directory for the measured runs")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--pretrained", help="cw10: pretraining run (small DT on MT40)")
    p.add_argument("--data", help="cw10: dataset root with the CW10 tasks")
    p.add_argument("--methods", default="lora,eva,eva_dora")
    p.add_argument("--peer", default="lora", help="method the ratios are against")
    p.add_argument("--tasks", default="CW10")
    p.add_argument("--config", default="cpu")
    p.add_argument("--steps", type=int, help="override the config's updates per task")
    p.add_argument("--eval-episodes", type=int, help="override the config's")
    p.add_argument("--max-episode-steps", type=int, help="override the config's")
    p.add_argument("--profile-eval", action="store_true",
                   help="quickstart: also split one evaluation into env / model time")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"{NOISY}; medians over repeats")
    if args.what == "quickstart":
        bench_quickstart(args)
    else:
        if not (args.pretrained and args.data):
            p.error("cw10 needs --pretrained and --data")
        bench_cw10(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
