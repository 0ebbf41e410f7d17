"""Benchmark tiers: the whole experiment (expert data, pretraining, both fine-tuning
protocols) under one name, sized for a machine, so that one command runs it, resumably,
and any of its cells can be rerun from nothing (`scripts/reproduce.py`).

    tier = get_tier("bench")
    collect_tier_data(tier, "runs/bench")
    pretrain_tier(tier, "runs/bench")
    run_experiment(single_experiment(tier, "runs/bench"), tier_paths("runs/bench").single)

Directory of a tier run::

    ROOT/tier.json        the tier (checked when the run is continued)
    ROOT/costs.json       wall-clock seconds per stage, summed over the sessions that ran it
    ROOT/data/<task>/     expert datasets (pretraining tasks, then the fine-tuning tasks)
    ROOT/pretrained/      the pretraining run
    ROOT/machine.json     the CPU and libraries that pretrained it (see `machine`)
    ROOT/single/          the `single` experiment (all methods x tasks x seeds)
    ROOT/sequential/      the `sequential` experiment
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agents.finetune_config import CONFIGS, FinetuneConfig
from agents.methods import METHODS
from agents.protocols import Experiment
from agents.tuning import (
    check_grid,
    n_trials,
    read_choice,
    trial_experiment,
    write_tuning_report,
)
from envs import CW10, MT40, resolve_task, resolve_tasks
from eva_rl.io import read_json_object, read_versioned_json, sha256_file, write_json_atomic
from eva_rl.schema import check_known_fields
from eva_rl.training import WEIGHTS_FILE, PretrainConfig, pretrain_train_config

TIER_FILE = "tier.json"
TIER_FORMAT = "eva-rl-tier"
COSTS_FILE = "costs.json"
COSTS_FORMAT = "eva-rl-tier-costs"
FINGERPRINTS_FILE = "fingerprints.json"
MACHINE_FILE = "machine.json"
STAGES = ("collect", "pretrain", "tune", "single", "sequential")


@dataclass(frozen=True)
class Tier:
    """One benchmark tier: what is collected, pretrained and fine-tuned, and how."""

    name: str
    """Its name (``--tier``)."""
    episodes: int
    """Scripted-expert episodes per task."""
    noise: tuple[float, ...]
    """The experts' action-noise schedule, cycled over episodes."""
    data_seed: int
    """Seed of the collection (each task's own seed is derived from it and its name)."""
    pretrain_tasks: tuple[str, ...]
    """Tasks the base model is pretrained on."""
    tuning_tasks: tuple[str, ...]
    """MT40 tasks held out of pretraining, on which the fine-tuning settings were chosen
    (never on the tasks reported)."""
    pretrain: PretrainConfig
    """Model and pretraining settings."""
    finetune: FinetuneConfig
    """Fine-tuning settings of both protocols."""
    tasks: tuple[str, ...] = CW10
    """The tasks reported."""
    methods: tuple[str, ...] = ("fft", "lora", "dora", "pissa", "olora", "adalora", "eva",
                                "eva_dora", "eva_reverse")
    """Methods of the `single` experiment."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Fine-tuning seeds (one pretrained model for all)."""
    sequential_methods: tuple[str, ...] = ("lora", "eva", "eva_dora", "fft")
    """Methods of the `sequential` experiment."""
    sequential_final_episodes: int = 10
    """Episodes per task of each success-matrix row under `sequential` (ten rows of ten
    tasks: the rows are most of that protocol's cost)."""
    threads: int = 1
    """Torch threads of pretraining and of each fine-tuning cell (results are exactly
    reproducible on the CPU for the same thread count)."""
    tuning: dict[str, tuple[dict[str, Any], ...]] | None = None
    """The tuning stage's grid (`agents.tuning`): per method of ``methods`` and
    ``sequential_methods``, the same number of settings to try on ``tuning_tasks``; the
    `single` and `sequential` stages then train every method with the settings chosen
    there. None: no tuning stage, every method at ``finetune``'s settings."""
    tuning_seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every tuning trial."""
    tuning_eval: dict[str, Any] | None = None
    """How the tuning cells evaluate, where it differs from ``finetune`` (fields of
    `TUNING_EVAL_FIELDS`): a trial's mean is over many cells, so each can evaluate less,
    and its start (the pretrained model, the same for every trial) is left out of the AUC
    anyway. None: as ``finetune``."""

    def __post_init__(self) -> None:
        for name, value in _checked_fields(self).items():
            object.__setattr__(self, name, value)  # task names resolved, sequences tuples
        if self.tuning is not None:
            # settings as JSON holds them (lists), so a tier equals itself read back
            grid = {m: tuple(json.loads(json.dumps(dict(s))) if isinstance(s, Mapping) else s
                             for s in trials) if isinstance(trials, (list, tuple)) else trials
                    for m, trials in dict(self.tuning).items()}
            try:
                check_grid(grid, tuple(dict.fromkeys(self.methods + self.sequential_methods)))
            except ValueError as err:
                raise ValueError(f"tier {self.name}: {err}") from None
            if not self.tuning_tasks:
                raise ValueError(f"tier {self.name}: a tuning grid needs tuning_tasks")
            object.__setattr__(self, "tuning", grid)
        if self.tuning_eval is not None:
            object.__setattr__(self, "tuning_eval", _checked_tuning_eval(self))
        overlap = set(self.pretrain_tasks) & (set(self.tasks) | set(self.tuning_tasks))
        if overlap:
            raise ValueError(f"tier {self.name}: pretraining tasks overlap the tuning or "
                             f"reported tasks: {', '.join(sorted(overlap))}")
        if set(self.tuning_tasks) & set(self.tasks):
            raise ValueError(f"tier {self.name}: tuning tasks must not be reported tasks")

    @property
    def data_tasks(self) -> tuple[str, ...]:
        """Every task with a dataset: pretraining, tuning, then the reported tasks."""
        return tuple(dict.fromkeys(self.pretrain_tasks + self.tuning_tasks + self.tasks))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["pretrain"] = dataclasses.asdict(self.pretrain)
        d["pretrain"]["train"] = self.pretrain.train.to_dict()
        d["finetune"] = self.finetune.to_dict()
        if self.tuning is None:  # tiers written before tuning existed compare equal
            del d["tuning"], d["tuning_seeds"]
        else:
            d["tuning"] = {m: [dict(s) for s in trials] for m, trials in self.tuning.items()}
        if self.tuning_eval is None:
            del d["tuning_eval"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tier:
        """Inverse of `to_dict` (unknown keys are an error)."""
        check_known_fields(cls, d, "tier")
        d = dict(d)
        pre = dict(d["pretrain"])
        pre["train"] = pretrain_train_config(**pre["train"])
        d["pretrain"] = PretrainConfig(**pre)
        d["finetune"] = FinetuneConfig.from_dict(d["finetune"])
        for name in _LIST_FIELDS:
            if name in d and not isinstance(d[name], list):
                raise ValueError(f"{name} must be a list, got {d[name]!r:.80}")
        return cls(**d)


TUNING_EVAL_FIELDS = ("eval_every", "eval_at_start", "eval_episodes", "final_eval_episodes")
"""The evaluation settings a tier's tuning cells may change (`Tier.tuning_eval`)."""


def _checked_tuning_eval(tier: Tier) -> dict[str, Any]:
    value = tier.tuning_eval
    if tier.tuning is None:
        raise ValueError(f"tier {tier.name}: tuning_eval needs a tuning grid")
    if not isinstance(value, Mapping) or not set(value) <= set(TUNING_EVAL_FIELDS):
        raise ValueError(f"tier {tier.name}: tuning_eval must be an object of "
                         f"{', '.join(TUNING_EVAL_FIELDS)}, got {value!r:.120}")
    try:
        tier.finetune.replace(**value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"tier {tier.name}: tuning_eval: {err}") from None
    return dict(value)


_LIST_FIELDS = ("noise", "pretrain_tasks", "tuning_tasks", "tasks", "methods", "seeds",
                "sequential_methods", "tuning_seeds")
# a tier's name names directories (runs/<name>, docs/results/<name>): one plain component
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _checked_fields(tier: Tier) -> dict[str, Any]:
    """Every field of ``tier`` checked (a ``ValueError`` naming the tier, the field and the
    value); returns the list fields as tuples, task names resolved (``hammer`` ->
    ``hammer-v3``)."""
    name = tier.name
    if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
        raise ValueError(f"tier name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                         "(it names directories), starting with a letter or digit")

    def bad(field: str, what: str) -> ValueError:
        return ValueError(f"tier {name}: {field} must be {what}, got "
                          f"{getattr(tier, field)!r:.120}")

    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    for field, least in (("episodes", 1), ("data_seed", 0), ("sequential_final_episodes", 1),
                         ("threads", 1)):
        if not count(getattr(tier, field), least):
            raise bad(field, f"an integer >= {least}")
    if not isinstance(tier.pretrain, PretrainConfig):
        raise bad("pretrain", "a PretrainConfig")
    if not isinstance(tier.finetune, FinetuneConfig):
        raise bad("finetune", "a FinetuneConfig")
    out: dict[str, Any] = {}
    for field in _LIST_FIELDS:
        value = getattr(tier, field)
        if not isinstance(value, (list, tuple)) or (not value and field != "tuning_tasks"):
            raise bad(field, "a non-empty list" if field != "tuning_tasks" else "a list")
        out[field] = tuple(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and v >= 0 for v in out["noise"]):
        raise bad("noise", "a list of finite numbers >= 0")
    for field in ("seeds", "tuning_seeds"):
        if not all(count(s, 0) for s in out[field]):
            raise bad(field, "a list of integers >= 0")
    if tier.tuning is not None and not isinstance(tier.tuning, Mapping):
        raise bad("tuning", "an object of method -> list of settings")
    for field in ("methods", "sequential_methods"):
        unknown = [m for m in out[field] if not (isinstance(m, str) and m in METHODS)]
        if unknown:
            raise ValueError(f"tier {name}: unknown {field} {unknown[0]!r}; valid methods: "
                             f"{', '.join(METHODS)}")
    for field in ("pretrain_tasks", "tuning_tasks", "tasks"):
        if not all(isinstance(t, str) for t in out[field]):
            raise bad(field, "a list of task names")
        try:
            out[field] = tuple(resolve_task(t) for t in out[field])
        except ValueError as err:
            raise ValueError(f"tier {name}: {field}: {err}") from None
    for field in _LIST_FIELDS[1:]:  # a noise schedule may repeat a level
        repeated = sorted({v for v in out[field] if out[field].count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"tier {name}: {field} lists {repeated[0]!r} more than once")
    return out


class TierPaths(NamedTuple):
    """Where a tier run keeps each stage."""

    root: Path
    data: Path
    pretrained: Path
    single: Path
    sequential: Path


def tier_paths(root: str | Path) -> TierPaths:
    """The stage directories of a tier run in ``root``."""
    root = Path(root)
    return TierPaths(root, root / "data", root / "pretrained", root / "single",
                     root / "sequential")


def _without(tasks: tuple[str, ...], removed: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t for t in tasks if t not in removed)


_BENCH_TUNING = resolve_tasks("stick-push,peg-insert-side,sweep-into,coffee-push,door-close")

TIERS: dict[str, Tier] = {
    "bench": Tier(
        name="bench",
        episodes=50,
        noise=(0.0, 0.1, 0.3, 0.5),
        data_seed=0,
        pretrain_tasks=_without(MT40, _BENCH_TUNING),
        tuning_tasks=_BENCH_TUNING,
        pretrain=PretrainConfig(preset="tiny", train=pretrain_train_config(
            steps=10_000, lr=1e-3, checkpoint_every=1000, log_every=100)),
        finetune=CONFIGS["bench"],
    ),
}


def _fair_grid(methods: Sequence[str]) -> dict[str, tuple[dict[str, Any], ...]]:
    """Four trials for every method. A method without a setting of its own sweeps its
    learning rate (``fft``: its own rates); a method with one (AdaLoRA's orthogonality
    weight, EVA's token handling) runs its default at the shared rate, 1e-2, and the
    alternative the held-out exploration pointed to at three rates, so that each default
    and its alternative meet at the same rate."""
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)
    grid = {}
    for m in methods:
        if m == "fft":
            grid[m] = tuple({"fft_lr": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3))
        elif METHODS[m].has_budget:
            grid[m] = ({"lr": 1e-2, "adalora_orth_weight": 0.5},
                       *({"lr": lr, "adalora_orth_weight": 0.0} for lr in lrs[1:]))
        elif METHODS[m].eva and not METHODS[m].settings:
            grid[m] = ({"lr": 1e-2},
                       *({"lr": lr, "eva_token_types": ("state",)} for lr in lrs[1:]))
        else:
            grid[m] = tuple({"lr": lr} for lr in lrs)
    return grid


_FAIR_METHODS = ("fft", "lora", "dora", "pissa", "olora", "adalora", "eva", "eva_dora",
                 "eva_reverse", "corda_ipm", "corda_kpm", "lora_ga")
# the bench tier on the fair protocol: the same data, a base model pretrained 3x longer
# (chosen on the held-out tasks: docs/results/bench/tuning/pretraining), every method at
# its own settings chosen on the held-out tasks that carry signal (stick-push stayed at
# 0.00 for every method and setting; door-close is solved before any update, so its
# cells only say whether a method breaks it: both are held out but not tuned on); a
# tuning cell evaluates once, after its last update, 20 episodes (the trial's mean is over
# 9 cells, and its AUC would only repeat its final success)
TIERS["bench-tuned"] = dataclasses.replace(
    TIERS["bench"], name="bench-tuned",
    pretrain=PretrainConfig(preset="tiny", train=pretrain_train_config(
        steps=30_000, lr=1e-3, checkpoint_every=1000, log_every=100)),
    tuning_tasks=resolve_tasks("peg-insert-side,sweep-into,coffee-push"),
    methods=_FAIR_METHODS, tuning=_fair_grid(_FAIR_METHODS), tuning_seeds=(0, 1, 2),
    tuning_eval={"eval_every": 0, "eval_at_start": False, "final_eval_episodes": 20})


def get_tier(name: str) -> Tier:
    """A named tier of `TIERS`, or the tier saved in a ``tier.json`` file at path ``name``
    (a custom one, or a published run's); neither -> one-line error with the names."""
    if name in TIERS:
        return TIERS[name]
    if name.endswith(".json") or Path(name).is_file():
        return read_tier_file(name)
    raise ValueError(f"unknown tier {name!r}; valid tiers: {', '.join(TIERS)} "
                     f"(or the path of a {TIER_FILE})")


def collect_tier_data(tier: Tier, root: str | Path, tasks: Sequence[str] | None = None,
                      workers: int = 1, progress: bool = True, *,
                      force_unlock: bool = False) -> None:
    """The tier's scripted-expert datasets of ``tasks`` (default: every task it uses) in
    ``root``; finished ones are kept (``force_unlock``: see `collect_datasets`)."""
    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector

    collector = ScriptedCollector(noise=tier.noise,
                                  max_episode_steps=tier.finetune.eval.max_episode_steps)
    collect_datasets(tier.data_tasks if tasks is None else tasks, collector, tier.episodes,
                     tier_paths(root).data, seed=tier.data_seed, workers=workers,
                     progress=progress, force_unlock=force_unlock)


def pretrain_tier(tier: Tier, root: str | Path, progress: bool = True, *,
                  force_unlock: bool = False) -> None:
    """The tier's base model in ``root`` (continued if interrupted), on ``tier.threads``
    torch threads; the machine that finishes it is recorded in ``root/machine.json``
    (``force_unlock``: see `eva_rl.training.pretrain`)."""
    import torch

    from eva_rl.training import pretrain

    paths = tier_paths(root)
    torch.set_num_threads(tier.threads)
    train = dataclasses.replace(tier.pretrain.train, progress=progress)
    pretrain(paths.data, tier.pretrain_tasks, paths.pretrained,
             dataclasses.replace(tier.pretrain, train=train), resume=True,
             force_unlock=force_unlock)
    if not (Path(root) / MACHINE_FILE).exists():
        write_json_atomic(Path(root) / MACHINE_FILE, machine())


def machine() -> dict[str, str]:
    """This machine's CPU, its instruction set as torch uses it, and the versions of Python
    and of the packages that shape data and weights (`agents.experts.package_versions`):
    the pretrained weights are bit-identical only where these agree (float rounding
    differs between instruction sets and library builds)."""
    import torch

    from agents.experts import package_versions

    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), **package_versions("torch")}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what `platform` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def tuned_config(tier: Tier, root: str | Path, methods: Sequence[str],
                 chosen: Mapping[str, Mapping[str, Any]] | None = None) -> FinetuneConfig:
    """``tier.finetune`` with every method's settings chosen by the tuning stage (from
    ``chosen``, else ``root/tuning/choice.json``); ``tier.finetune`` for a tier without
    a tuning grid."""
    if tier.tuning is None:
        return tier.finetune
    chosen = read_choice(root, tier) if chosen is None else chosen
    return tier.finetune.replace(method_settings={m: dict(chosen[m]) for m in methods})


def single_experiment(tier: Tier, root: str | Path,
                      chosen: Mapping[str, Mapping[str, Any]] | None = None) -> Experiment:
    """The tier's `single` experiment on the data and pretrained model in ``root`` (with the
    tuned settings: ``chosen``, else the tuning stage's choice in ``root``)."""
    paths = tier_paths(root)
    return Experiment(pretrained=str(paths.pretrained), data=str(paths.data), tasks=tier.tasks,
                      methods=tier.methods, seeds=tier.seeds, protocol="single",
                      config=tuned_config(tier, root, tier.methods, chosen))


def sequential_experiment(tier: Tier, root: str | Path,
                          chosen: Mapping[str, Mapping[str, Any]] | None = None) -> Experiment:
    """The tier's `sequential` experiment (rows of ``sequential_final_episodes``)."""
    paths = tier_paths(root)
    config = tuned_config(tier, root, tier.sequential_methods, chosen).replace(
        final_eval_episodes=tier.sequential_final_episodes)
    return Experiment(pretrained=str(paths.pretrained), data=str(paths.data), tasks=tier.tasks,
                      methods=tier.sequential_methods, seeds=tier.seeds,
                      protocol="sequential", config=config)


def tune_tier(tier: Tier, root: str | Path,
              run: Callable[[Experiment, Path], Any]) -> dict[str, dict[str, Any]] | None:
    """The tuning stage: every trial of the tier's grid as a `single` experiment
    (``run(exp, run_dir)``, e.g. `agents.protocols.run_experiment` with an executor,
    continuing what was started), then the choice (`agents.tuning.write_tuning_report`).
    None for a tier without a grid."""
    if tier.tuning is None:
        return None
    paths = tier_paths(root)
    for index in range(n_trials(tier)):
        run(*trial_experiment(tier, paths, index))
    return write_tuning_report(tier, paths)


def write_tier_file(tier: Tier, path: str | Path) -> Path:
    """Save ``tier`` as JSON (what `read_tier_file` and ``--tier PATH`` read)."""
    return write_json_atomic(path, {"format": TIER_FORMAT, "version": 1, "tier": tier.to_dict()})


def prepare_tier_dir(tier: Tier, root: str | Path) -> None:
    """Create ``root`` for ``tier`` or check that it holds this tier's run."""
    root = Path(root)
    if check_tier_dir(tier, root):
        return
    root.mkdir(parents=True, exist_ok=True)
    write_tier_file(tier, root / TIER_FILE)


def check_tier_dir(tier: Tier, root: str | Path) -> bool:
    """Whether ``root`` already holds ``tier``'s run (False: no ``tier.json`` yet); a
    ``root`` that is a file or holds another tier is a ``ValueError``. Writes nothing."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    path = root / TIER_FILE
    if not path.exists():
        return False
    saved = read_tier_file(path).to_dict()
    if saved != tier.to_dict():
        changed = sorted(k for k in saved if saved[k] != tier.to_dict()[k])
        raise ValueError(f"{path} holds another tier's settings (differs in: "
                         f"{', '.join(changed)}); use another directory")
    return True


def check_stage(tier: Tier, root: str | Path, stage: str, after: Sequence[str] = ()) -> None:
    """Refuse, writing nothing, a ``stage`` of ``tier`` (or ``report``) in ``root`` that
    would be refused once started: its inputs missing or unusable (datasets, the
    pretrained model, its run directory, results to report). Inputs that a stage in
    ``after`` (run before it in the same session) makes are not checked yet."""
    from agents.protocols import check_inputs
    from eva_rl.data import open_datasets

    paths = tier_paths(root)
    if stage == "pretrain" and "collect" not in after:
        open_datasets(paths.data, tier.pretrain_tasks)  # DatasetError names the directory
    elif stage == "tune" and tier.tuning is not None:
        if "pretrain" not in after and not (paths.pretrained / WEIGHTS_FILE).is_file():
            raise ValueError(f"{paths.pretrained}: no pretrained model yet; run the pretrain "
                             "stage first (add it to --stages)")
        if "collect" not in after:
            open_datasets(paths.data, tier.tuning_tasks)
    elif stage in ("single", "sequential"):
        if tier.tuning is not None and "tune" not in after:
            read_choice(root, tier)  # the settings it trains with
        if tier.tuning is None or "tune" not in after:
            check_stage_dir(tier, root, stage)
        if "pretrain" not in after and not (paths.pretrained / WEIGHTS_FILE).is_file():
            raise ValueError(f"{paths.pretrained}: no pretrained model yet; run the pretrain "
                             "stage first (add it to --stages)")
        if not {"collect", "pretrain", "tune"} & set(after):
            check_inputs(stage_experiment(tier, root, stage)[0])  # the model and the data
        elif "collect" not in after:
            open_datasets(paths.data, tier.tasks)
    elif stage == "report":
        runs = [d / "results.json" for d in (paths.single, paths.sequential)]
        if not set(after) & {"single", "sequential"} and not any(r.exists() for r in runs):
            raise ValueError(f"{root}: no results to report yet (run the single or "
                             "sequential stage first)")
    elif stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}, report")


def check_stage_dir(tier: Tier, root: str | Path, protocol: str) -> None:
    """Refuse (writing nothing) a ``single`` / ``sequential`` run directory in ``root``
    that the tier's stage could not continue (`check_run_dir`)."""
    check_run_dir(tier, root, *stage_experiment(tier, root, protocol))


def check_run_dir(tier: Tier, root: str | Path, exp: Experiment, run_dir: Path) -> None:
    """Refuse (writing nothing) a run directory of ``tier`` in ``root`` that its stage
    could not continue: made by a tier run elsewhere (the experiment records the absolute
    paths of its data and pretrained model, so a copied or moved tier run does not
    continue) or with other settings than ``exp``."""
    from agents.runs import read_experiment
    from eva_rl.runlock import is_empty_dir

    if not run_dir.is_dir() or is_empty_dir(run_dir):
        return
    experiment = read_experiment(run_dir)
    diffs = exp.differences(experiment if isinstance(experiment, dict) else {})
    if not diffs:
        return
    if all(d.split(":")[0] in ("pretrained", "data") for d in diffs):
        raise ValueError(
            f"{run_dir} was made by a tier run in another directory ({'; '.join(diffs)}): a "
            "tier run does not continue after it was copied or moved. Continue it where it "
            f"was made, or start this tier in a new --out with --restore-from {Path(root)} "
            "(its finished cells are taken over as records)")
    raise ValueError(f"{run_dir} holds a {exp.protocol} experiment with other settings than "
                     f"tier {tier.name}'s ({'; '.join(diffs)}); use a new --out")


def read_tier_file(path: str | Path) -> Tier:
    """The tier saved in ``path`` (a ``tier.json``); a clear error naming the file if it is
    missing, corrupt or not a tier."""
    obj = read_versioned_json(path, TIER_FORMAT, 1, "tier file")
    try:
        return Tier.from_dict(obj["tier"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: corrupt tier file: {err}") from err


def read_costs(root: str | Path) -> dict[str, dict[str, float]]:
    """``{"seconds": {stage: s}, "peak_rss_mib": {stage: MiB}}`` so far."""
    path = Path(root) / COSTS_FILE
    if not path.exists():
        return {"seconds": {}, "peak_rss_mib": {}}
    obj = read_versioned_json(path, COSTS_FORMAT, 1, "tier costs")
    for key in ("seconds", "peak_rss_mib"):
        part = obj.get(key)
        if not (isinstance(part, dict) and all(
                k in STAGES and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0 for k, v in part.items())):
            raise ValueError(f"{path}: corrupt tier costs: {key!r} must map stages "
                             f"({', '.join(STAGES)}) to numbers >= 0")
    return {"seconds": dict(obj["seconds"]), "peak_rss_mib": dict(obj["peak_rss_mib"])}


@contextmanager
def timed_stage(root: str | Path, stage: str,
                peak_mib: Callable[[], float] | None = None) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``costs.json`` under ``stage`` (also when
    it is interrupted: a resumed stage's cost is the sum of its sessions), and the largest
    ``peak_mib()`` seen after it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    path = Path(root) / COSTS_FILE
    t0 = time.perf_counter()
    try:
        yield
    finally:
        costs = read_costs(root)
        seconds, peaks = costs["seconds"], costs["peak_rss_mib"]
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        if peak_mib is not None:
            peaks[stage] = max(peaks.get(stage, 0.0), peak_mib())
        write_json_atomic(path, {"format": COSTS_FORMAT, "version": 1, **costs})


def fingerprints(root: str | Path, tasks: Sequence[str]) -> dict[str, Any]:
    """SHA-256 of each task's dataset arrays and of the pretrained weights in tier run
    ``root`` (what `scripts/reproduce.py` compares to find where a rerun diverged), and the
    machine that pretrained them (``root/machine.json``; None where not recorded)."""
    paths = tier_paths(root)
    data = {}
    for task in tasks:
        arrays = sorted((paths.data / task).glob("*.npy"))
        data[task] = hashlib.sha256("".join(sha256_file(a) for a in arrays).encode()).hexdigest()
    return {"data": data, "pretrained": sha256_file(paths.pretrained / WEIGHTS_FILE),
            "machine": pretrained_on(root)}


def read_fingerprints(published: str | Path) -> dict[str, Any] | None:
    """A published tier's ``fingerprints.json`` (None where it has none), checked as
    untrusted input: ``{"data": {task: sha256}, "pretrained": sha256, "machine": {...} |
    null}`` with 64-digit lowercase hex digests (``machine`` may be absent). Anything else
    is a ``ValueError`` naming the file and what is wrong."""
    path = Path(published) / FINGERPRINTS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    obj = read_json_object(path, "fingerprints file")
    data, pretrained = obj.get("data"), obj.get("pretrained")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: corrupt fingerprints file: 'data' must be an object of "
                         f"task -> SHA-256, got {_kind(data)}")
    for task, digest in data.items():
        if not _is_sha256(digest):
            raise ValueError(f"{path}: corrupt fingerprints file: data[{task!r}] is not a "
                             f"SHA-256 hex digest ({digest!r})")
    if not _is_sha256(pretrained):
        raise ValueError(f"{path}: corrupt fingerprints file: 'pretrained' is not a SHA-256 "
                         f"hex digest ({pretrained!r})")
    _check_machine(path, obj.get("machine"))
    return obj


def pretrained_on(root: str | Path) -> dict[str, str] | None:
    """The machine recorded in ``root/machine.json`` (None for runs made before it was); a
    file that is not a JSON object of strings is a ``ValueError`` naming it."""
    path = Path(root) / MACHINE_FILE
    if not path.exists():
        return None
    info = read_json_object(path, "machine record")
    _check_machine(path, info)
    return info


def _check_machine(path: Path, info: Any) -> None:
    if info is not None and not (isinstance(info, dict)
                                 and all(isinstance(v, str) for v in info.values())):
        raise ValueError(f"{path}: corrupt machine record: expected an object of strings "
                         f"(cpu, cpu_capability, versions) or null, got {info!r:.200}")


def _is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def describe_machine(info: dict[str, str] | None) -> str:
    """One line for a `machine` record."""
    if not isinstance(info, dict) or not info:
        return "a machine that was not recorded"
    return (f"{info.get('cpu', '?')} ({info.get('cpu_capability', '?')}; torch "
            f"{info.get('torch', '?')}, numpy {info.get('numpy', '?')})")


def explain_base_difference(published: dict[str, str] | None,
                            here: dict[str, str] | None) -> str:
    """Why two pretrained models of the same tier may differ, from the `machine` records
    of the runs that made them: the CPU kinds (float rounding differs between instruction
    sets), the library versions, or neither (the same machine recorded twice: then
    rounding across CPUs is not the cause)."""
    if not isinstance(published, dict) or not isinstance(here, dict) or not published \
            or not here:
        return ("a machine was not recorded, so whether the CPU kinds differ is unknown "
                "(float rounding differs between CPU kinds)")
    changed = [k for k in sorted(set(published) & set(here)) if published[k] != here[k]]
    cpu = [k for k in changed if k in ("cpu", "cpu_capability")]
    libs = ", ".join(f"{k} {published[k]} vs {here[k]}" for k in changed if k not in cpu)
    if cpu:
        return ("float rounding differs between CPU kinds"
                + (f" and library versions ({libs})" if libs else ""))
    if libs:
        return (f"the CPU kind is the same but library versions differ ({libs}): float "
                "rounding can differ between library builds")
    return ("both runs recorded the same machine (CPU, instruction set and library versions "
            "equal), so the weights differ on the same recorded machine: float rounding "
            "across CPU kinds does not explain it; something else changed (the settings, a "
            "library build under the same version, the thread count, or the published files)")


def check_same_base(root: str | Path, published: str | Path) -> None:
    """Refuse to continue a published tier in ``root`` when the base model pretrained there
    is not the one its cells were made with (its SHA-256 in ``fingerprints.json``): the
    comparison would mix two base models. Checked once ``root`` has its pretrained model."""
    saved = read_fingerprints(published)
    weights = tier_paths(root).pretrained / WEIGHTS_FILE
    if saved is None or not weights.exists() or saved["pretrained"] == sha256_file(weights):
        return
    here = pretrained_on(root)
    why = explain_base_difference(saved.get("machine"), here)
    raise ValueError(
        f"{weights} is not the base model of {published} (SHA-256 differs from its "
        f"{FINGERPRINTS_FILE}): adding cells made on it would mix two base models in one "
        f"comparison. It was pretrained on {describe_machine(here)}, the "
        f"published one on {describe_machine(saved.get('machine'))}; the data and "
        f"pretraining are deterministic, but {why}. "
        "Run the missing cells where the published base model is remade bit for bit, or run "
        "the whole tier on one kind of machine")


def cost_split(costs: dict[str, dict[str, float]], results: dict[str, Any]) -> dict[str, Any]:
    """Where a tier's time went: wall-clock seconds per stage (``costs.json``) and, summed
    over the fine-tuning task records of ``results`` per protocol, the seconds of training
    updates, evaluation, EVA init and routing signatures (worker seconds: with N cells at
    once they add up to about N x the stage's wall time), with the largest peak RSS of a
    process that ran cells."""
    split: dict[str, Any] = {"stage_seconds": dict(costs["seconds"]),
                             "stage_peak_rss_mib": dict(costs["peak_rss_mib"])}
    for run in results["runs"]:
        part = split.setdefault(run["protocol"], {
            "cells": 0, "train_seconds": 0.0, "eval_seconds": 0.0, "eva_seconds": 0.0,
            "signature_seconds": 0.0, "row_eval_seconds": 0.0, "worker_peak_rss_mib": 0.0})
        for rec in run["per_task"]:
            part["cells"] += 1
            for key in ("train_seconds", "eval_seconds", "eva_seconds", "signature_seconds",
                        "row_eval_seconds"):
                part[key] += float(rec.get(key) or 0.0)
            part["worker_peak_rss_mib"] = max(part["worker_peak_rss_mib"],
                                              float(rec.get("peak_rss_mib") or 0.0))
    return split


def format_cost_split(split: dict[str, Any]) -> str:
    """`cost_split` as markdown tables."""
    lines = ["## Wall-clock time per stage", "", "| stage | seconds | peak RSS (MiB) |",
             "|---|---|---|"]
    for stage, seconds in split["stage_seconds"].items():
        peak = split["stage_peak_rss_mib"].get(stage)
        lines.append(f"| {stage} | {seconds:.0f} | {'–' if peak is None else f'{peak:.0f}'} |")
    for protocol in ("single", "sequential"):
        part = split.get(protocol)
        if not part:
            continue
        parts = ("train_seconds", "eval_seconds", "row_eval_seconds", "eva_seconds",
                 "signature_seconds")
        total = sum(part[k] for k in parts) or 1.0
        lines += ["", f"## Inside the `{protocol}` cells ({part['cells']} task records; "
                  "worker seconds)", "", "| part | seconds | share |", "|---|---|---|"]
        for key in parts:
            if part[key]:
                lines.append(f"| {key.removesuffix('_seconds').replace('_', ' ')} | "
                             f"{part[key]:.0f} | {100 * part[key] / total:.1f}% |")
        lines += ["", f"Largest peak RSS of a process that ran cells: "
                  f"{part['worker_peak_rss_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def stage_experiment(tier: Tier, root: str | Path, protocol: str) -> tuple[Experiment, Path]:
    """The tier's ``single`` or ``sequential`` experiment and its run directory in ``root``."""
    if protocol not in ("single", "sequential"):
        raise ValueError(f"unknown protocol {protocol!r}; valid: single, sequential")
    make = single_experiment if protocol == "single" else sequential_experiment
    return make(tier, root), getattr(tier_paths(root), protocol)


RESTORABLE_STAGES = ("tune", "single", "sequential")


def restore_cells(tier: Tier, root: str | Path, published: str | Path,
                  stage: str = "single") -> int:
    """Write the finished cells of a published tier's ``stage`` (``published/<stage>/
    results.json``, or for ``tune`` every ``published/tuning/trial_<t>/results.json``)
    into its run directories in ``root`` as finished task records, so that the stage runs
    only the cells still missing (e.g. a seed a session had no time for, or a tuning
    stage already published). A `sequential` chain is restored only when all its tasks
    finished (a part of a chain cannot continue without its weights). The published tier
    must equal ``tier``, its records pass `agents.tier_records.published_records` (checked
    as untrusted input, all before the first is written); cells already in ``root`` are
    kept. Returns the number of task records written; their share of the published
    stage's seconds joins ``root/costs.json``. Restored cells have a record only (no
    adapter or signature: routing and PEFT export need the cell rerun). Refused when
    ``root``'s pretrained model is not the published one (`check_same_base`)."""
    from agents.runs import (
        TaskRecord,
        prepare_run_dir,
        read_record,
        run_dir_of,
        task_dir_of,
        write_record,
    )

    published = Path(published)
    checked, total = check_restore_source(tier, published, stage)
    check_same_base(root, published)
    targets = restore_sources(tier, root, stage)
    for (exp, run_root, _), (source, _) in zip(targets, checked, strict=True):
        check_run_dir(tier, root, exp, run_root)
        diffs = exp.config.differences(source.config.to_dict())
        if diffs:  # e.g. this run's tuning chose otherwise than the published one's
            raise ValueError(f"{published}: its {stage} cells were trained with other "
                             f"settings than this run's ({'; '.join(diffs[:3])}); they cannot "
                             "be restored here")
    written = 0
    for (exp, run_root, _), (_, records) in zip(targets, checked, strict=True):
        prepare_run_dir(run_root, exp, resume=True)
        for method, seed, rec in records:
            tdir = task_dir_of(run_dir_of(run_root, method, seed), rec["index"], rec["task"])
            if read_record(tdir) is None:
                tdir.mkdir(parents=True, exist_ok=True)
                write_record(tdir, TaskRecord.from_dict(rec, f"{published}: {tdir.name}"))
                written += 1
    if written:
        carry_restored_costs(root, published, written / total, stage)
    return written


def restore_sources(tier: Tier, root: str | Path, stage: str
                    ) -> list[tuple[Experiment, Path, str]]:
    """The experiments a ``stage`` of ``tier`` runs in ``root``, each with its run
    directory and where a publication keeps its ``results.json`` (relative to it)."""
    if stage == "tune":
        if tier.tuning is None:
            return []
        paths = tier_paths(root)
        trials = [trial_experiment(tier, paths, t) for t in range(n_trials(tier))]
        return [(exp, run_dir, run_dir.relative_to(paths.root).as_posix())
                for exp, run_dir in trials]
    if stage not in RESTORABLE_STAGES:
        raise ValueError(f"stage {stage!r} cannot be restored; valid: "
                         f"{', '.join(RESTORABLE_STAGES)}")
    return [(*stage_experiment(tier, root, stage), stage)]


def check_restore_source(tier: Tier, published: str | Path, stage: str = "single"
                         ) -> tuple[list[tuple[Experiment, list[tuple[str, int, dict[str, Any]]]]],
                                    int]:
    """Check a published tier for `restore_cells` without writing anything: a directory
    whose ``tier.json`` is ``tier``, whose ``fingerprints.json`` and ``costs.json`` read,
    and whose ``stage`` records pass `agents.tier_records.published_records`. Returns,
    per experiment of the stage (in `restore_sources`' order), the experiment as published
    and its restorable records ``[(method, seed, record)]``, and the stage's total of
    published records. A
    ``ValueError`` naming the file and the problem otherwise."""
    from agents.tier_records import published_records

    published = Path(published)
    if not published.is_dir():
        raise FileNotFoundError(f"--restore-from {published}: no such directory (a published "
                                f"tier, holding {TIER_FILE})")
    saved = read_tier_file(published / TIER_FILE)
    if saved != tier:
        changed = sorted(k for k, v in saved.to_dict().items() if tier.to_dict()[k] != v)
        raise ValueError(f"{published / TIER_FILE} is another tier's (differs in: "
                         f"{', '.join(changed)}); its cells cannot be reused for {tier.name}")
    read_fingerprints(published)
    read_costs(published)
    checked, total = [], 0
    for exp, _, sub in restore_sources(tier, published, stage):
        records, n = published_records(exp, exp.seeds, published / sub / "results.json")
        checked.append((exp, records))
        total += n
    return checked, total


def carry_restored_costs(root: str | Path, published: str | Path, share: float,
                         stage: str = "single") -> None:
    """Add ``share`` of the published ``stage``'s seconds (the cost of the cells restored
    from it) to ``root/costs.json``, so that the stage's cost stays the sum of every
    session that ran its cells."""
    published_costs = read_costs(published)
    seconds = published_costs["seconds"].get(stage)
    if seconds is None:
        return
    costs = read_costs(root)
    costs["seconds"][stage] = costs["seconds"].get(stage, 0.0) + share * seconds
    peak = published_costs["peak_rss_mib"].get(stage)
    if peak is not None:
        costs["peak_rss_mib"][stage] = max(costs["peak_rss_mib"].get(stage, 0.0), peak)
    write_json_atomic(Path(root) / COSTS_FILE, {"format": COSTS_FORMAT, "version": 1, **costs})
