r"""Fine-tune a pretrained Decision Transformer on a task sequence with one or more methods.

Runs the `single` (each task from the pretrained model; the EVA paper's Table 23) or the
`sequential` (continual) protocol for every method x seed, then writes results.json,
results.csv, report.md, plots/ and tb/ into --out and prints the table. Resumable: run
the same command with --resume after an interruption.

Example:
    python scripts/finetune.py --pretrained runs/pretrain-small --data data/cw10 \
        --protocol single --methods lora,eva,eva_dora --tasks CW10 --seeds 0 \
        --config cpu --out runs/cw10-single
    python scripts/finetune.py ... --out runs/cw10-single --resume
    python scripts/finetune.py ... --protocol sequential --routing eva  # no task labels
    python scripts/finetune.py ... --executor ray                      # every core here
    python scripts/finetune.py ... --executor ray --ray-address HEAD:6379 --gpus-per-cell 0.25
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from agents.executors import Executor, LocalExecutor, RayExecutor
from agents.finetune_config import CONFIGS, FLAT_FIELDS, GROUPS, FinetuneConfig, get_config
from agents.methods import METHODS, get_method
from agents.protocols import PROTOCOLS, Experiment, parse_seeds, run_experiment
from agents.reports import format_table, read_summary
from eva_rl.schema import add_field_flags
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads

from script_cli import ScriptParser, script_main

DEFAULT_CONFIG = "cpu"
UNFLAGGED = ("seed", "progress")  # seed: per task (from --seeds); progress: --no-progress
TRAIN_HELP = ("The optimisation of one task (TrainConfig); lr is the adapter methods' peak "
              "learning rate, fft_lr full fine-tuning's.")


def describe_configs() -> str:
    """What each named preset sets, as its differences from the fields' defaults."""
    default = FinetuneConfig().flat_settings()
    lines = []
    for name, config in sorted(CONFIGS.items()):
        changed = [f"{k}={v}" for k, v in config.flat_settings().items() if v != default[k]]
        lines.append(f"{name}: {', '.join(changed) or 'the defaults'}")
    return "; ".join(lines)


def add_settings_flags(parser: argparse.ArgumentParser, preset: FinetuneConfig) -> list[str]:
    """One option group per group of fine-tuning settings (`GROUPS`), each setting a flag
    named by its flat name (`FLAT_FIELDS`: ``--eva-token-types``) with its docstring and
    ``preset``'s value; each group described by its class docstring. Returns the flat names
    (for ``config.replace(**...)``)."""
    names = []
    for group, cls in GROUPS.items():
        description = TRAIN_HELP if group == "train" else " ".join(cls.__doc__.split())
        flags = parser.add_argument_group(f"{group} settings (config.{group})", description)
        fields = {field: flat for flat, (g, field) in FLAT_FIELDS.items()
                  if g == group and flat not in UNFLAGGED}
        names += add_field_flags(flags, cls, list(fields), defaults=getattr(preset, group),
                                 dests=fields)
        if group == "train":
            names += add_field_flags(flags, FinetuneConfig, ["fft_lr"], defaults=preset)
    flags = parser.add_argument_group("per-method settings",
                                      "Settings of single methods over the shared ones.")
    return names + add_field_flags(flags, FinetuneConfig, ["method_settings"], defaults=preset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", required=True, help="pretraining run directory")
    p.add_argument("--data", required=True, help="dataset root with one directory per task")
    p.add_argument("--protocol", choices=PROTOCOLS, default="single")
    p.add_argument("--methods", required=True, help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--tasks", default="CW10", help="suite (CW10, CW20) or comma list of tasks")
    p.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
    p.add_argument("--out", required=True, help="run directory to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out")
    mode.add_argument("--overwrite", action="store_true",
                      help="move an existing run in --out aside (to OUT.old-<time>), start anew")
    p.add_argument("--config", choices=sorted(CONFIGS), default=DEFAULT_CONFIG,
                   help=f"settings preset (default: {DEFAULT_CONFIG}); the fine-tuning settings "
                        f"below override its values (the defaults shown are {DEFAULT_CONFIG}'s). "
                        "Presets: "
                        + describe_configs().replace("%", "%%"))
    p.set_defaults(config_fields=add_settings_flags(p, CONFIGS[DEFAULT_CONFIG]))
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over --out although a process on another host holds its lock")
    ex = p.add_argument_group("where cells run (a cell: method x seed, and x task under single)")
    ex.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: one cell after another here; ray: each cell a Ray task")
    ex.add_argument("--ray-address", help="join this Ray cluster (host:port or auto); "
                    "default: start a local Ray with every core")
    ex.add_argument("--cpus-per-cell", type=float, default=1, help="Ray CPUs of one cell")
    ex.add_argument("--gpus-per-cell", type=float, default=0,
                    help="Ray GPUs of one cell (fractions pack cells: 0.25 = four per GPU)")
    return p.parse_args(argv)


def check_routing(exp: Experiment) -> None:
    """--routing needs the sequential protocol and adapter methods (before anything is
    written)."""
    router = exp.config.routing.router
    if router == "oracle":
        return
    if exp.protocol != "sequential":
        raise ValueError(f"--routing {router} needs --protocol sequential (under "
                         "single every task is evaluated on its own adapter)")
    full = [m for m in exp.methods if get_method(m).is_full]
    if full:
        raise ValueError(f"--routing {router}: {', '.join(full)} trains one model "
                         "for all tasks; there are no task adapters to route among")


def make_executor(args: argparse.Namespace) -> Executor:
    """The executor the options ask for (Ray options without --executor ray are an error)."""
    if args.executor == "local":
        if args.ray_address is not None:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor()
    return RayExecutor(address=args.ray_address, cpus_per_cell=args.cpus_per_cell,
                       gpus_per_cell=args.gpus_per_cell)


@script_main(known=(RuntimeError,))  # RuntimeError: a Ray cell that failed all its retries
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    # run_experiment checks the device, the pretrained run and the data, then takes the
    # run lock, and only then writes OUT/config.json
    config = get_config(args.config).replace(
        **{name: getattr(args, name) for name in args.config_fields},
        progress=False if args.no_progress else None)
    exp = Experiment(pretrained=args.pretrained, data=args.data, tasks=args.tasks,
                     methods=args.methods.split(","), seeds=parse_seeds(args.seeds),
                     protocol=args.protocol, config=config)
    check_routing(exp)
    executor = make_executor(args)
    t0 = time.perf_counter()
    # the cells and the report, under one hold of OUT's run lock
    run_experiment(exp, args.out, resume=args.resume, overwrite=args.overwrite,
                   executor=executor, force_unlock=args.force_unlock)
    print(format_table(read_summary(args.out)))  # the report's, not bootstrapped again
    print(f"\n{time.perf_counter() - t0:.0f} s. Report: {args.out}/report.md, plots: "
          f"{args.out}/plots/, tensorboard: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
