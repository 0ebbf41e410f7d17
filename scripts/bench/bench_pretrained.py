"""How good is a pretrained DT? Success per task next to a random policy on the same seeds.

Evaluates the run with `agents.evaluate` and, on the very same env seeds, a policy that
draws uniform random actions in [-1, 1], and prints both per task and on average.

Example:
    python scripts/bench/bench_pretrained.py --run runs/pretrain-small --tasks MT40 --episodes 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agents import DTAgent, evaluate
from envs import final_step_infos, make_vec_env, resolve_tasks

from common import set_threads


def random_policy_success(tasks: list[str], n_episodes: int, seed: int,
                          max_episode_steps: int) -> dict[str, float]:
    """Success rate per task of uniform random actions (env seeds as in `evaluate`)."""
    venv = make_vec_env(tasks, n_envs=n_episodes, seed=seed, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    try:
        venv.reset()
        success = np.zeros(venv.num_envs, dtype=bool)
        for _ in range(max_episode_steps):
            actions = rng.uniform(-1.0, 1.0, size=(venv.num_envs, 4)).astype(np.float32)
            _, _, terminated, truncated, infos = venv.step(actions)
            ended = terminated | truncated
            success |= np.asarray(infos.get("success", np.zeros(venv.num_envs)), bool) & ~ended
            for i, info in final_step_infos(infos, ended).items():
                success[i] |= bool(info.get("success", False))
            if ended.all():
                break
    finally:
        venv.close()
    per_task = success.reshape(len(tasks), n_episodes).mean(axis=1)
    return {task: float(s) for task, s in zip(tasks, per_task, strict=True)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="pretraining run directory")
    p.add_argument("--tasks", default="MT40")
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-episode-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    tasks = list(dict.fromkeys(resolve_tasks(args.tasks)))

    agent = DTAgent.load(args.run)
    t0 = time.perf_counter()
    dt = evaluate(agent, tasks, n_episodes=args.episodes, seed=args.seed,
                  max_episode_steps=args.max_episode_steps, progress=False)
    t_dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    rand = random_policy_success(tasks, args.episodes, args.seed, args.max_episode_steps)
    t_rand = time.perf_counter() - t0

    print(f"{'task':<28} {'DT success':>10} {'random':>8}")
    for task in tasks:
        print(f"{task:<28} {dt[task]['success_rate']:>10.2f} {rand[task]:>8.2f}")
    dt_mean = float(np.mean([dt[t]["success_rate"] for t in tasks]))
    rand_mean = float(np.mean(list(rand.values())))
    print(f"{'mean over ' + str(len(tasks)) + ' tasks':<28} {dt_mean:>10.3f} {rand_mean:>8.3f}")
    print(f"{args.episodes} episodes per task; DT evaluation {t_dt:.0f} s, random {t_rand:.0f} s")


if __name__ == "__main__":
    main()
