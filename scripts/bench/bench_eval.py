r"""Evaluation throughput: `evaluate` on fresh envs vs pooled envs vs a one-episode loop
vs raw env steps, side by side.

Measures env steps per second, model included, of (a) `agents.evaluation.evaluate` with
fresh envs on every call (``EnvPool(max_envs=0)``: the behaviour before the env pool, env
building included), (b) the same call on a warm `envs.EnvPool` (the default since the
pool: envs kept and reseeded), (c) the loop of the reference Decision Transformer ports
(one env, one episode, one forward of batch 1 per step; skipped with
``--loop-episodes 0``) and (d) the raw env step rate of the same tasks with random
actions and no model. They run interleaved, `--repeats` times; medians and ratios are
printed, with the memory the pool holds. It also times one model forward over the full
context window against one over a single timestep (the lower bound of a key/value-cached
step) and prints the ceiling the model puts on the ratio to the raw rate.

Throughput does not depend on the weights, so without `--run` the model is a freshly
initialised preset (`--preset`, default `small`) with unit state statistics.

Example:
    python scripts/bench/bench_eval.py --preset small --tasks hammer,push-wall,faucet-close \
        --episodes 10 --repeats 3 --threads 1
    # smoke run (the test suite's):
    python scripts/bench/bench_eval.py --preset tiny --tasks reach --episodes 2 \
        --loop-episodes 1 --max-steps 10 --repeats 1 --forward-threads 1 --forward-reps 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from agents.dt_agent import DTAgent
from agents.evaluation import DEFAULT_WAVE_SIZE, evaluate
from envs import EnvPool, make_env, resolve_tasks
from eva_rl.models import DecisionTransformer, DTConfig

from common import NOISY, median, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a run directory (default: a fresh model)")
    p.add_argument("--preset", default="small", help="model preset without --run")
    p.add_argument("--tasks", default="hammer,push-wall,faucet-close")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task")
    p.add_argument("--wave-size", type=int, default=DEFAULT_WAVE_SIZE,
                   help="most envs stepping at once in evaluate")
    p.add_argument("--loop-episodes", type=int, default=2,
                   help="episodes per task of the one-at-a-time loop and the raw env loop "
                        "(0: no one-at-a-time loop, one raw episode per task)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--forward-threads", type=int, nargs="+", default=None,
                   help="thread counts of the forward timing (default: 1, 2 and torch's)")
    p.add_argument("--forward-reps", type=int, default=20, help="forwards timed per variant")
    return p.parse_args(argv)


def make_agent(args: argparse.Namespace, tasks: tuple[str, ...]) -> DTAgent:
    if args.run is not None:
        return DTAgent.load(args.run, device="cpu")
    torch.manual_seed(args.seed)
    model = DecisionTransformer(DTConfig.preset(args.preset))
    dim = model.config.state_dim
    return DTAgent(model, np.zeros(dim), np.ones(dim), dict.fromkeys(tasks, 1000.0), device="cpu")


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def evaluation(agent: DTAgent, tasks: tuple[str, ...], args: argparse.Namespace,
               pool: EnvPool) -> tuple[int, float]:
    """(env steps, seconds) of one `evaluate` call on `pool`."""
    t0 = time.perf_counter()
    res = evaluate(agent, tasks, n_episodes=args.episodes, seed=args.seed,
                   max_episode_steps=args.max_steps, progress=False, pool=pool,
                   wave_size=args.wave_size)
    return sum(sum(r["lengths"]) for r in res.values()), time.perf_counter() - t0


def one_at_a_time(agent: DTAgent, envs: dict, args: argparse.Namespace) -> tuple[int, float]:
    """The reference ports' loop: per task and episode, act / step / observe."""
    steps, t0 = 0, time.perf_counter()
    for task, env in envs.items():
        agent.set_task(task)
        for _ in range(args.loop_episodes):
            agent.reset()
            obs, _ = env.reset()
            done = False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
                agent.observe(reward)
                done = terminated or truncated
                steps += 1
    return steps, time.perf_counter() - t0


def raw_env(envs: dict, args: argparse.Namespace) -> tuple[int, float]:
    """Env steps with random actions, no model."""
    steps, t0 = 0, time.perf_counter()
    for env in envs.values():
        for _ in range(max(1, args.loop_episodes)):
            env.reset()
            done = False
            while not done:
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                done = terminated or truncated
                steps += 1
    return steps, time.perf_counter() - t0


@torch.inference_mode()
def forward_times(agent: DTAgent, batch: int, threads: tuple[int, ...], reps: int = 20
                  ) -> dict[tuple[int, int], float]:
    """Median ms of one forward over (batch, k) timesteps, k = context_len and 1, for each
    torch thread count; all variants interleaved."""
    cfg, model = agent.config, agent.model
    inputs = {
        k: dict(
            states=torch.randn(batch, k, cfg.state_dim),
            actions=torch.zeros(batch, k, cfg.act_dim),
            rewards=torch.zeros(batch, k, 1),
            returns_to_go=torch.ones(batch, k, 1),
            timesteps=torch.arange(k).expand(batch, k),
        )
        for k in (cfg.context_len, 1)
    }
    before = torch.get_num_threads()
    times: dict[tuple[int, int], list[float]] = {(k, n): [] for k in inputs for n in threads}
    for _ in range(reps):
        for k, n in times:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            model(**inputs[k])
            times[(k, n)].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return {key: 1000 * median(v) for key, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    tasks = tuple(dict.fromkeys(resolve_tasks(args.tasks.split(","))))
    agent = make_agent(args, tasks)
    n_params = sum(p.numel() for p in agent.model.parameters())
    print(f"model: {args.run or args.preset} ({n_params / 1e6:.2f}M params), tasks: "
          f"{', '.join(tasks)}; {args.episodes} episodes per task, waves of at most "
          f"{args.wave_size}; torch threads: {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    envs = {t: make_env(t, seed=args.seed + i, max_episode_steps=args.max_steps)
            for i, t in enumerate(tasks)}
    pool = EnvPool(max_envs=len(tasks) * args.episodes)
    before = rss_mb()
    steps, first = evaluation(agent, tasks, args, pool)  # builds the pool's envs
    held = rss_mb() - before
    print(f"pool: {len(pool)} envs, +{held:.0f} MB resident ({held / len(pool):.1f} MB per env); "
          f"first pooled call (building them) {steps / first:.0f} steps/s")
    rates: dict[str, list[float]] = {"fresh": [], "pooled": [], "raw": []}
    if args.loop_episodes > 0:
        rates["loop"] = []
    for rep in range(args.repeats):
        steps, t_fresh = evaluation(agent, tasks, args, EnvPool(max_envs=0))
        rates["fresh"].append(steps / t_fresh)
        steps, t_pool = evaluation(agent, tasks, args, pool)
        rates["pooled"].append(steps / t_pool)
        line = (f"repeat {rep}: fresh envs {rates['fresh'][-1]:.0f} steps/s ({t_fresh:.1f} s), "
                f"pooled {rates['pooled'][-1]:.0f} ({t_pool:.1f} s)")
        if "loop" in rates:
            steps_l, t_l = one_at_a_time(agent, envs, args)
            rates["loop"].append(steps_l / t_l)
            line += f", loop {rates['loop'][-1]:.0f}"
        steps_r, t_r = raw_env(envs, args)
        rates["raw"].append(steps_r / t_r)
        print(line + f", raw {rates['raw'][-1]:.0f}")
    med = {k: median(v) for k, v in rates.items()}
    print(f"\nmedians over {args.repeats} repeats (env steps/s, model included):")
    for k, v in med.items():
        print(f"  {k:<14} {v:8.0f}")
    print(f"  pooled / fresh         {med['pooled'] / med['fresh']:.2f}x")
    if "loop" in med:
        print(f"  pooled / loop          {med['pooled'] / med['loop']:.2f}x")
    print(f"  fresh / raw env        {med['fresh'] / med['raw']:.2f}")
    print(f"  pooled / raw env       {med['pooled'] / med['raw']:.2f}  (goal >= 0.7)")
    pool.close()
    batch = min(args.wave_size, len(tasks) * args.episodes)
    k = agent.config.context_len
    threads = args.forward_threads or (1, 2, torch.get_num_threads())
    ms = forward_times(agent, batch, threads=tuple(dict.fromkeys(threads)),
                       reps=args.forward_reps)
    print(f"\nforward of a wave of {batch} episodes (median ms; a KV-cached step would cost "
          "at least the one-timestep forward):")
    env_ms = 1000 / med["raw"]
    for n in sorted({n for _, n in ms}):
        full, one = ms[(k, n)], ms[(1, n)]
        model_ms = full / batch
        print(f"  {n} thread(s): full window ({k} steps) {full:.2f} ms, one timestep "
              f"{one:.2f} ms, ratio {full / one:.1f}x; full window per env step "
              f"{model_ms:.3f} ms against {env_ms:.3f} ms per raw env step: the model caps "
              f"the ratio to the raw rate at {env_ms / (env_ms + model_ms):.2f}")
    print(NOISY)


if __name__ == "__main__":
    main()
