r"""Benchmark expert-data collection; prints markdown tables of measured numbers.

Sections (pick with --sections, default all but sac):
  throughput  transitions/s of scripted collection per worker against the raw Meta-World
              env.step rate with random actions on the same task, interleaved, as a ratio
  scaling     collect_datasets over several tasks with 1 and then 2 worker processes
  quality     success rate and mean return per CW10 task for each scripted noise level
              (and dataset size on disk per 100k transitions)
  sac         the same for the SAC collector with a small training budget (--sac-steps)

Timings are medians over --repeats runs; on a shared machine they vary between runs.

Example:
    python scripts/bench/bench_collect.py --sections throughput,scaling --repeats 3
    python scripts/bench/bench_collect.py --sections quality --episodes 10
    python scripts/bench/bench_collect.py --sections sac --sac-steps 2000 --tasks reach,push
    # smoke run (the test suite's): tiny sizes, 20-step episodes
    python scripts/bench/bench_collect.py --sections throughput,scaling,quality,sac \
        --tasks reach --scaling-tasks reach,push --repeats 1 --episodes 1 \
        --throughput-episodes 1 --scaling-episodes 1 --sac-steps 40 --max-episode-steps 20
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from agents.collection import collect_datasets
from agents.experts import SACCollector, ScriptedCollector, ScriptedExpert, rollout
from envs import make_env, resolve_tasks

from common import NOISY, median

SETTINGS = {  # label -> scripted collector settings of the quality table
    "noise 0": {"noise": (0.0,)},
    "noise 0.1": {"noise": (0.1,)},
    "noise 0.3": {"noise": (0.3,)},
    "eps 0.2": {"epsilon": (0.2,)},
    "schedule 0,0.1,0.3,0.5": {"noise": (0.0, 0.1, 0.3, 0.5)},
}


def bare_rate(task: str, actions: np.ndarray, episodes: int, seed: int) -> float:
    """Steps/s of the bare Meta-World env (no wrappers), resets included, stepping
    ``actions`` (H, 4) in each of ``episodes`` episodes."""
    env = make_env(task, seed=seed).unwrapped
    start = time.perf_counter()
    for e in range(episodes):
        env.reset()
        for a in actions[e]:
            env.step(a)
    return actions[:episodes].shape[0] * actions.shape[1] / (time.perf_counter() - start)


def collect_rates(task: str, episodes: int, seed: int, horizon: int) -> dict[str, float]:
    """Steps/s of: bare env with random actions; bare env replaying the expert's actions
    (same physics as collection, no policy); scripted collection on a built env; the whole
    ``ScriptedCollector.collect`` including env creation. Resets included in all."""
    rng = np.random.default_rng(seed)
    rand = rng.uniform(-1, 1, (episodes, horizon, 4)).astype(np.float32)
    out = {"raw random": bare_rate(task, rand, episodes, seed)}
    env = make_env(task, seed=seed, max_episode_steps=horizon)
    expert = ScriptedExpert(task, noise_std=0.1, seed=seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = rollout(env, expert.act, episodes)
    out["collection"] = len(traj.rewards) / (time.perf_counter() - start)
    out["bare replay"] = bare_rate(task, traj.actions.reshape(episodes, horizon, 4), episodes, seed)
    start = time.perf_counter()
    whole = ScriptedCollector(noise=(0.1,), max_episode_steps=horizon).collect(
        task, episodes, seed=seed)
    out["collect() incl. env creation"] = len(whole.rewards) / (time.perf_counter() - start)
    return out


def bench_throughput(tasks, repeats, episodes, horizon) -> None:
    print(
        f"\n### Throughput per worker ({episodes} episodes of {horizon} steps per run, "
        f"median of {repeats}, resets included)\n"
    )
    print(
        "raw random = bare Meta-World env.step, uniform random actions; bare replay = bare "
        "env stepping the collected expert actions (same contacts/physics as collection); "
        "collection = scripted expert (noise 0.1) + clipping + our wrappers + storing\n"
    )
    cols = ["raw random", "bare replay", "collection", "collect() incl. env creation"]
    print(
        "| task | " + " | ".join(f"{c} /s" for c in cols) + " | collection / raw random "
        "| collection / bare replay |"
    )
    print("|---|" + "---|" * (len(cols) + 2))
    vs_raw, vs_replay = [], []
    for task in tasks:
        runs = [collect_rates(task, episodes, r, horizon) for r in range(repeats)]  # interleaved
        med = {c: median(run[c] for run in runs) for c in cols}
        a = median(run["collection"] / run["raw random"] for run in runs)
        b = median(run["collection"] / run["bare replay"] for run in runs)
        vs_raw.append(a)
        vs_replay.append(b)
        print(
            f"| {task} | " + " | ".join(f"{med[c]:.0f}" for c in cols) + f" | {a:.2f} | {b:.2f} |"
        )
    print(
        "| **median** |" + " |" * len(cols) + f" **{median(vs_raw):.2f}** | "
        f"**{median(vs_replay):.2f}** |"
    )


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_scaling(tasks, repeats, episodes, horizon) -> None:
    collector = ScriptedCollector(noise=(0.1,), max_episode_steps=horizon)
    total = len(tasks) * episodes * horizon
    wall: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):  # interleaved
            with tempfile.TemporaryDirectory() as out:
                cpu0, start = _cpu_seconds(), time.perf_counter()
                collect_datasets(tasks, collector, episodes, out, workers=workers, progress=False)
                wall[workers].append(time.perf_counter() - start)
                cpu[workers].append(_cpu_seconds() - cpu0)
    print(
        f"\n### Scaling: {len(tasks)} tasks x {episodes} episodes ({total} transitions), "
        f"median of {repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| workers | seconds | transitions/s | speed-up vs 1 | CPU seconds (all processes) |")
    print("|---|---|---|---|---|")
    base = median(wall[1])
    for workers, ts in wall.items():
        t = median(ts)
        print(
            f"| {workers} | {t:.1f} | {total / t:.0f} | {base / t:.2f} | "
            f"{median(cpu[workers]):.1f} |"
        )


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quality_table(results: dict[str, dict[str, tuple[float, float]]], tasks) -> None:
    labels = list(results)
    print("| task | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for task in tasks:
        cells = [f"{results[lab][task][0]:.2f} / {results[lab][task][1]:.0f}" for lab in labels]
        print(f"| {task} | " + " | ".join(cells) + " |")
    means = [
        f"{np.mean([results[lab][t][0] for t in tasks]):.2f} / "
        f"{np.mean([results[lab][t][1] for t in tasks]):.0f}"
        for lab in labels
    ]
    print("| **mean** | " + " | ".join(means) + " |")


def bench_quality(tasks, episodes, workers, horizon) -> None:
    results: dict[str, dict[str, tuple[float, float]]] = {}
    sizes = []
    with tempfile.TemporaryDirectory() as root:
        for label, settings in SETTINGS.items():
            out = Path(root) / label.replace(" ", "_")
            summaries = collect_datasets(
                tasks, ScriptedCollector(**settings, max_episode_steps=horizon), episodes, out,
                workers=workers, progress=False,
            )
            results[label] = {s.task: (s.success_rate, s.mean_return) for s in summaries}
            sizes += [(_du(Path(s.path)), s.n_transitions) for s in summaries]
    print(
        f"\n### Scripted experts: success rate / mean return, {episodes} episodes of {horizon} "
        f"steps per cell\n"
    )
    _quality_table(results, tasks)
    per_100k = 100_000 * sum(b for b, _ in sizes) / sum(n for _, n in sizes)
    print(
        f"\nDataset size on disk: {per_100k / 2**20:.1f} MiB per 100k transitions "
        f"({sum(n for _, n in sizes)} transitions measured)"
    )


def bench_sac(tasks, episodes, steps, workers, horizon) -> None:
    collector = SACCollector(train_steps=steps, source="policy", max_episode_steps=horizon)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summaries = collect_datasets(
            tasks, collector, episodes, out, workers=workers, progress=False
        )
        seconds = time.perf_counter() - start
    results = {f"SAC {steps} steps": {s.task: (s.success_rate, s.mean_return) for s in summaries}}
    print(
        f"\n### SAC ({steps} training steps per task, then {episodes} policy episodes): "
        f"success rate / mean return; {seconds:.0f} s with {workers} worker(s)\n"
    )
    _quality_table(results, [s.task for s in summaries])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="throughput,scaling,quality")
    p.add_argument("--tasks", default="CW10", help="tasks for throughput / quality / sac")
    p.add_argument("--scaling-tasks", default="reach,push,hammer,window-close")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--episodes", type=int, default=10, help="episodes per task and cell")
    p.add_argument("--throughput-episodes", type=int, default=10)
    p.add_argument("--scaling-episodes", type=int, default=5)
    p.add_argument("--sac-steps", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-episode-steps", type=int, default=200, help="episode horizon")
    args = p.parse_args(argv)
    horizon = args.max_episode_steps
    tasks = resolve_tasks(args.tasks)
    sections = [s.strip() for s in args.sections.split(",")]
    print(
        f"bench_collect on {os.cpu_count()} CPU(s); medians; {NOISY}"
    )
    if "throughput" in sections:
        bench_throughput(tasks, args.repeats, args.throughput_episodes, horizon)
    if "scaling" in sections:
        bench_scaling(resolve_tasks(args.scaling_tasks), args.repeats, args.scaling_episodes,
                      horizon)
    if "quality" in sections:
        bench_quality(tasks, args.episodes, args.workers, horizon)
    if "sac" in sections:
        bench_sac(tasks, args.episodes, args.sac_steps, args.workers, horizon)


if __name__ == "__main__":
    main()
