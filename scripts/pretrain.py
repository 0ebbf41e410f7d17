r"""Pretrain a Decision Transformer on offline task datasets and write a run directory.

Opens ``DATA/<task>`` for every task, computes state-normalisation statistics and
per-task target returns (the maximum episode return in each dataset), trains, and
writes ``OUT/config.json``, ``OUT/model.safetensors``, ``OUT/tb/`` and
``OUT/checkpoints/`` (docs/CONTRACTS.md, "Run directory").

Example:
    python scripts/pretrain.py --data data/mt40 --tasks MT40 --preset small \
        --steps 20000 --out runs/pretrain-small
    # continue it (e.g. after an interruption, or to more steps):
    python scripts/pretrain.py --data data/mt40 --tasks MT40 --steps 30000 \
        --out runs/pretrain-small --resume
    # two processes (gloo on CPU, nccl on GPUs), same global batch:
    torchrun --nproc_per_node 2 scripts/pretrain.py --data data/mt40 --tasks MT40 ...
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import envs
from eva_rl.data import WindowSampler, compute_state_stats, open_datasets
from eva_rl.models import PRESETS, DecisionTransformer, DTConfig
from eva_rl.training import (
    TrainConfig,
    Trainer,
    init_distributed,
    read_run_config,
    save_weights,
    write_run_config,
)
from eva_rl.training.distributed import cleanup

DEFAULTS = TrainConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root holding one directory per task")
    p.add_argument("--tasks", required=True, help="suite name (MT40) or comma list of tasks")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, required=True, help="optimizer updates in total")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved model and training "
                        "settings (only --steps may change)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all processes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr)
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up updates (default: min(4000, steps // 10))")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=None)
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--context-len", type=int, default=None, help="override the preset's")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's")
    p.add_argument("--reward-scale", type=float, default=200.0)
    p.add_argument("--mixing", default="uniform", choices=["uniform", "proportional"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often fastest for the small presets on a "
                        "busy 2-core machine)")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, obs_dim: int, act_dim: int, horizon: int
                 ) -> DTConfig:
    overrides = {"state_dim": obs_dim, "act_dim": act_dim, "reward_scale": args.reward_scale,
                 "max_ep_len": max(1000, horizon)}
    if args.context_len is not None:
        overrides["context_len"] = args.context_len
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    return DTConfig.preset(args.preset, **overrides)


def train_config(args: argparse.Namespace) -> TrainConfig:
    warmup = min(4000, args.steps // 10) if args.warmup is None else args.warmup
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=min(args.min_lr, args.lr), warmup_steps=warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, precision=args.precision,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, seed=args.seed, device=args.device,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if not args.resume and out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} already exists; pass --resume to continue it or "
                         "choose a new --out")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    dist = init_distributed(args.device)
    try:
        tasks = envs.resolve_tasks(args.tasks)
        datasets = open_datasets(args.data, tasks)
        first = next(iter(datasets.values()))
        horizon = max(int(ds.episode_lengths.max()) for ds in datasets.values())
        if args.resume:
            saved = read_run_config(out)
            cfg = DTConfig.from_dict(saved["model"])
            if (cfg.state_dim, cfg.act_dim) != (first.obs_dim, first.act_dim):
                raise SystemExit(
                    f"error: {out} holds a model with state_dim={cfg.state_dim}, "
                    f"act_dim={cfg.act_dim}, but the data in {args.data} has obs_dim="
                    f"{first.obs_dim}, act_dim={first.act_dim}"
                )
            if list(saved["tasks"]) != list(tasks):
                raise SystemExit(f"error: {out} was trained on {saved['tasks']}, not {tasks}")
            tcfg = TrainConfig.from_dict({**saved["train"], "steps": args.steps,
                                          "progress": not args.no_progress})
            mean, std, targets = saved["state_mean"], saved["state_std"], saved["target_returns"]
        else:
            cfg = model_config(args, first.obs_dim, first.act_dim, horizon)
            tcfg = train_config(args)
            mean, std = compute_state_stats(datasets)
            targets = {t: float(ds.episode_returns.max()) for t, ds in datasets.items()}
        if horizon > cfg.max_ep_len:
            raise SystemExit(f"error: episodes of {horizon} steps exceed max_ep_len="
                             f"{cfg.max_ep_len} of the model")
        sampler = WindowSampler(list(datasets.values()), cfg.context_len,
                                reward_scale=cfg.reward_scale, mixing=args.mixing,
                                state_mean=mean, state_std=std, seed=args.seed)
        torch.manual_seed(args.seed)  # the initial weights, so seeded runs are reproducible
        model = DecisionTransformer(cfg)
        if dist.is_main:
            write_run_config(out, model=cfg, train=tcfg, tasks=tasks, data=str(args.data),
                             state_mean=mean, state_std=std, target_returns=targets,
                             overwrite=args.resume, mixing=args.mixing, seed=args.seed)
            print(f"{len(tasks)} tasks, {sum(d.n_transitions for d in datasets.values())} "
                  f"transitions; model {args.preset}: {model.num_parameters():,} parameters; "
                  f"{dist.world_size} process(es) on {dist.device}")
        trainer = Trainer(model, sampler, tcfg, out,
                          hparams={"model": cfg.to_dict(), "tasks": ",".join(tasks)})
        t0 = time.perf_counter()
        history = trainer.train(resume=args.resume)
        if dist.is_main:
            save_weights(model, out / "model.safetensors")
            if history:
                step, loss, _ = history[-1]
                print(f"step {step}: loss {loss:.4f}; {time.perf_counter() - t0:.1f} s "
                      f"this session ({trainer.precision}); wrote {out}")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
