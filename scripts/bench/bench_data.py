r"""Benchmark the trajectory format and the window sampler on synthetic Meta-World-sized data.

Measures, with peers timed in the same run (interleaved repeats, medians):
- size on disk per 100k transitions, ours against the papers' uncompressed .npz layout;
- open + validate time of one 1M-transition dataset against loading the same arrays with
  np.load (memory-mapped, and fully into RAM) and loading the papers' .npz;
- random-window throughput (windows/s, MB/s of batch arrays) of WindowSampler against a
  per-sample loop like the reference Decision Transformer's ``get_batch``.

Example:
    .venv/bin/python scripts/bench/bench_data.py --transitions 1000000 --repeats 5
    # smoke run (the test suite's):
    .venv/bin/python scripts/bench/bench_data.py --transitions 2000 --tasks 2 --per-task 1000 \
        --batch 8 --contexts 5 --repeats 1
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from eva_rl.data import WindowSampler, compute_state_stats, open_dataset, write_dataset

from common import NOISY, interleaved, median, median_time

OBS_DIM, ACT_DIM, EP_LEN = 39, 4, 200


def synthetic(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ep = -(-n // EP_LEN)
    return {
        "observations": rng.normal(size=(n, OBS_DIM)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32),
        "rewards": rng.uniform(0, 10, size=n).astype(np.float32),
        "successes": rng.uniform(size=n) > 0.9,
        "episode_offsets": np.minimum(np.arange(n_ep + 1) * EP_LEN, n).astype(np.int64),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def reference_get_batch(episodes, p_sample, batch_size, K, mean, std, scale):
    """The reference DT's per-sample loop (decision-transformer gym/experiment.py), numpy."""

    def discount_cumsum(x):
        out = np.zeros_like(x)
        out[-1] = x[-1]
        for t in reversed(range(x.shape[0] - 1)):
            out[t] = x[t] + out[t + 1]
        return out

    idx = np.random.choice(len(episodes), size=batch_size, replace=True, p=p_sample)
    s, a, r, rtg, ts, mask = [], [], [], [], [], []
    for i in range(batch_size):
        obs, act, rew = episodes[idx[i]]
        si = random.randint(0, rew.shape[0] - 1)
        s.append(np.asarray(obs[si : si + K]).reshape(1, -1, OBS_DIM))
        a.append(np.asarray(act[si : si + K]).reshape(1, -1, ACT_DIM))
        r.append(np.asarray(rew[si : si + K]).reshape(1, -1, 1))
        tlen = s[-1].shape[1]
        ts.append(np.arange(si, si + tlen).reshape(1, -1))
        rtg.append(discount_cumsum(np.asarray(rew[si:]))[:tlen].reshape(1, -1, 1))
        s[-1] = np.concatenate([np.zeros((1, K - tlen, OBS_DIM)), s[-1]], axis=1)
        s[-1] = (s[-1] - mean) / std
        a[-1] = np.concatenate([np.ones((1, K - tlen, ACT_DIM)) * -10.0, a[-1]], axis=1)
        r[-1] = np.concatenate([np.zeros((1, K - tlen, 1)), r[-1]], axis=1)
        rtg[-1] = np.concatenate([np.zeros((1, K - tlen, 1)), rtg[-1]], axis=1) / scale
        ts[-1] = np.concatenate([np.zeros((1, K - tlen)), ts[-1]], axis=1)
        mask.append(np.concatenate([np.zeros((1, K - tlen)), np.ones((1, tlen))], axis=1))
    return [np.concatenate(x, axis=0) for x in (s, a, r, rtg, ts, mask)]


def bench_storage(root: Path, n: int, repeats: int) -> None:
    arrays = synthetic(n, seed=0)
    t = time.perf_counter()
    write_dataset(root / "big", task="big", **arrays, metadata={"collector": "synthetic"})
    t_write = time.perf_counter() - t
    npz = root / "big.npz"
    dones = np.zeros(n, np.float32)
    dones[arrays["episode_offsets"][1:] - 1] = 1
    np.savez(
        npz,
        observations=arrays["observations"],
        next_observations=arrays["observations"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        dones=dones,
    )
    ours, theirs = dir_bytes(root / "big"), npz.stat().st_size
    print(f"\n## storage ({n:,} transitions, obs {OBS_DIM}, act {ACT_DIM}, float32)")
    print(f"write_dataset (incl. fsync + validation): {t_write:.2f} s")
    print(
        f"size per 100k transitions: ours {ours / n * 1e5 / 2**20:.2f} MiB, "
        f"papers' npz (uncompressed, with next_observations) {theirs / n * 1e5 / 2**20:.2f} MiB "
        f"-> ratio ours/npz {ours / theirs:.2f}"
    )

    def open_validated():
        open_dataset(root / "big").episode_returns  # noqa: B018 (touch the lazy stats)

    def open_no_finite():
        open_dataset(root / "big", check_finite=False)

    def np_mmap():
        for f in ("observations", "actions", "rewards", "successes", "episode_offsets"):
            np.load(root / "big" / f"{f}.npy", mmap_mode="r")

    def np_ram():
        for f in ("observations", "actions", "rewards", "successes", "episode_offsets"):
            np.load(root / "big" / f"{f}.npy")

    def npz_ram():
        with np.load(npz) as z:
            for k in z.files:
                z[k]

    peers = {
        "open_dataset (full validation)": open_validated,
        "open_dataset(check_finite=False)": open_no_finite,
        "np.load mmap, no checks": np_mmap,
        "np.load into RAM": np_ram,
        "papers' npz into RAM": npz_ram,
    }
    # interleaved so drift hits every contender alike
    times, _ = interleaved(peers, repeats, warmup=False)
    base = median(times["open_dataset (full validation)"])
    print(f"open time, warm page cache, median of {repeats} (ratio = its time / ours):")
    for name, ts in times.items():
        med = median(ts)
        print(f"  {name:36s} {med * 1e3:9.1f} ms   ratio {med / base:6.2f}")
    stats_t = median_time(lambda: compute_state_stats([open_dataset(root / "big")]), 3)
    print(f"compute_state_stats over {n:,} transitions: {stats_t:.2f} s")


def bench_sampler(root: Path, n_tasks: int, per_task: int, batch: int, contexts, repeats: int):
    datasets = []
    for t in range(n_tasks):
        a = synthetic(per_task, seed=100 + t)
        datasets.append(write_dataset(root / f"task{t}", task=f"task{t}", **a, metadata={}))
    mean, std = compute_state_stats(datasets)
    t0 = time.perf_counter()
    WindowSampler(datasets, context_len=20, state_mean=mean, state_std=std)
    t_build = time.perf_counter() - t0
    print(f"\n## window sampler ({n_tasks} tasks x {per_task:,} transitions, memory-mapped)")
    print(f"WindowSampler construction (RTG precompute): {t_build * 1e3:.0f} ms")
    episodes = [
        (
            d.observations[lo:hi],
            d.actions[lo:hi],
            d.rewards[lo:hi],
        )
        for d in datasets
        for lo, hi in zip(d.episode_offsets[:-1], d.episode_offsets[1:], strict=True)
    ]
    lengths = np.array([len(e[2]) for e in episodes])
    p_sample = lengths / lengths.sum()
    np.random.seed(0)
    random.seed(0)
    n_batches = 50
    for K in contexts:
        sampler = WindowSampler(datasets, K, state_mean=mean, state_std=std, mixing="proportional")
        b = sampler.sample(batch)
        mb = sum(v.nbytes for v in b.values()) / 2**20

        def ours(sampler=sampler, n_batches=n_batches):
            for _ in range(n_batches):
                sampler.sample(batch)

        def peer(K=K, n_batches=n_batches):
            for _ in range(n_batches):
                reference_get_batch(episodes, p_sample, batch, K, mean, std, 200.0)

        times, _ = interleaved({"ours": ours, "peer": peer}, repeats, warmup=False)
        mo, mp = (median(times[k]) / n_batches for k in ("ours", "peer"))
        print(
            f"batch {batch}, context {K}: ours {mo * 1e3:.2f} ms/batch = {batch / mo:,.0f} "
            f"windows/s = {mb / mo:,.0f} MB/s of batch arrays; reference loop "
            f"{mp * 1e3:.2f} ms/batch = {batch / mp:,.0f} windows/s -> ours {mp / mo:.1f}x faster"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=1_000_000, help="size of the open test")
    p.add_argument("--tasks", type=int, default=10, help="tasks in the sampler test")
    p.add_argument("--per-task", type=int, default=100_000, help="transitions per sampler task")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", default=[20, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.dir))
    print(f"{NOISY}; medians of interleaved repeats")
    try:
        bench_storage(root, args.transitions, args.repeats)
        bench_sampler(root, args.tasks, args.per_task, args.batch, args.contexts, args.repeats)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
