"""Our adapters in and out of Hugging Face PEFT's format: time and fidelity.

1. Time: 10 CW10-named adapters on one DT are exported with `export_peft`, then loaded by
   PEFT onto the base (`PeftModel.from_pretrained` for the first, `load_adapter` for the
   rest); total and per-adapter seconds (median of --repeats).
2. Fidelity, per adapter kind (random non-zero B so the adapter matters): the max absolute
   difference of the predicted actions (and of the last hidden states) between our model
   and PEFT's after export -> PEFT load (lora, dora, eva, pissa, olora, adalora: random
   P, Q, Λ with about half of the triplets pruned), and after a PEFT adapter ->
   `save_pretrained` -> `import_peft` (peft_lora, peft_dora, peft_adalora: pruned by PEFT's
   own `update_and_allocate` over a short schedule); then the full round trip back to where
   it started (ours -> PEFT -> PEFT's save -> ours; PEFT -> ours -> export -> PEFT), and how
   much the adapter moves the actions at all. float32.

    .venv/bin/python scripts/bench/bench_peft.py --preset small --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from envs import CW10
from eva_rl.adapters import (
    AdaLoraSchedule,
    AdapterConfig,
    adapter_layers,
    add_adapter,
    export_peft,
    import_peft,
    set_active_adapter,
)
from eva_rl.eva import EvaConfig, apply_eva, compute_eva
from eva_rl.models.dt import DecisionTransformer, DTConfig

KINDS = ("lora", "dora", "eva", "pissa", "olora", "adalora")
PEFT_KINDS = ("peft_lora", "peft_dora", "peft_adalora")
SCHEDULE = AdaLoraSchedule(total_steps=8, target_rank=2, tinit=1, tfinal=2, delta_t=1)
"""The AdaLoRA schedule of the adalora kinds (written into PEFT's AdaLoraConfig)."""


def make_batch(cfg: DTConfig, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, K = batch_size, cfg.context_len
    return {
        "states": torch.randn(B, K, cfg.state_dim, generator=g),
        "actions": torch.rand(B, K, cfg.act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(B, K, 1, generator=g),
        "returns_to_go": torch.randn(B, K, 1, generator=g),
        "timesteps": torch.randint(0, cfg.max_ep_len - K, (B, 1), generator=g) + torch.arange(K),
    }


@torch.no_grad()
def randomize(model, name: str, seed: int) -> None:
    """Non-zero B (and a perturbed A / magnitude) so the adapter changes the output;
    AdaLoRA: a random Λ with about half of its entries pruned (zero)."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        if name in layer.lora_A:
            for p in (layer.lora_A[name], layer.lora_B[name]):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].mul_(
                    torch.rand(layer.lora_magnitude_vector[name].shape, generator=g) + 0.5)
            if name in layer.lora_E:
                e = layer.lora_E[name]
                kept = torch.rand(e.shape, generator=g) < 0.5
                e.copy_(torch.randn(e.shape, generator=g) * kept)


def add_kind(model, kind: str, name: str, rank: int, seed: int) -> dict[str, object]:
    """Adapter `name` of `kind`; returns export_peft's extra arguments (EVA's config, AdaLoRA's
    schedule)."""
    if kind == "eva":
        eva = EvaConfig(rank=rank, rho=2.0, tau=0.99, max_batches=8)
        batches = (make_batch(model.config, 8, seed + i) for i in range(eva.max_batches))
        result = compute_eva(model, batches, eva)
        apply_eva(model, name, result, AdapterConfig(method="lora", rank=rank, alpha=rank))
        extra: dict[str, object] = {"eva": eva}
    else:
        add_adapter(model, name, AdapterConfig(method=kind, rank=rank, alpha=float(rank)))
        extra = {"adalora": SCHEDULE} if kind == "adalora" else {}
    randomize(model, name, seed)
    return extra


@torch.no_grad()
def diffs(a, b, batch) -> tuple[float, float]:
    """(max |actions a - actions b|, max |hidden a - hidden b|)."""
    ia = a.get_base_model() if hasattr(a, "get_base_model") else a
    ib = b.get_base_model() if hasattr(b, "get_base_model") else b
    act = float((a(**batch) - b(**batch)).abs().max())
    hid = float((ia.hidden_states(**batch) - ib.hidden_states(**batch)).abs().max())
    return act, hid


def time_ten(base, kind: str, rank: int, root: Path, repeats: int) -> dict[str, float]:
    """Median seconds to export 10 adapters and to load them all in PEFT."""
    import peft

    ours = copy.deepcopy(base)
    tasks = list(CW10)
    extra = {task: add_kind(ours, kind, task, rank, seed=i) for i, task in enumerate(tasks)}
    export_s, load_s = [], []
    for rep in range(repeats):
        out = root / f"ten{rep}"
        t0 = time.perf_counter()
        for task in tasks:
            export_peft(ours, task, out / task, **extra[task])
        export_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / tasks[0],
                                               adapter_name=tasks[0])
        for task in tasks[1:]:
            model.load_adapter(out / task, adapter_name=task)
        load_s.append(time.perf_counter() - t0)
    # the last loaded adapters reproduce ours
    batch = make_batch(base.config, 4, 99)
    worst = 0.0
    for task in tasks:
        set_active_adapter(ours, task)
        model.set_adapter(task)
        worst = max(worst, diffs(ours, model.eval(), batch)[0])
    return {"export_s": statistics.median(export_s), "load_s": statistics.median(load_s),
            "max_action_diff": worst}


def fidelity(base, rank: int, root: Path) -> dict[str, tuple[float, ...]]:
    """Per kind: (actions diff, hidden diff, round-trip actions diff, adapter effect)."""
    import peft

    batch = make_batch(base.config, 8, 123)
    out: dict[str, tuple[float, ...]] = {}
    for i, kind in enumerate(KINDS):
        ours = copy.deepcopy(base)
        extra = add_kind(ours, kind, "t", rank, seed=10 + i)
        export_peft(ours, "t", root / kind, **extra)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / kind).eval()
        theirs.save_pretrained(root / f"{kind}-peft")
        back = copy.deepcopy(base)
        import_peft(back, root / f"{kind}-peft", "t")
        out[kind] = (*diffs(ours, theirs, batch), diffs(ours, back, batch)[0],
                     diffs(ours, base, batch)[0])
    for kind in PEFT_KINDS:
        theirs = peft_adalora(base, rank) if kind == "peft_adalora" else peft_lora(base, kind, rank)
        theirs.save_pretrained(root / kind)
        ours = copy.deepcopy(base)
        import_peft(ours, root / kind, "t")
        extra = {"adalora": SCHEDULE} if kind == "peft_adalora" else {}
        export_peft(ours, "t", root / f"{kind}-ours", **extra)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / f"{kind}-ours").eval()
        theirs.eval()
        out[kind] = (*diffs(ours, theirs, batch), diffs(theirs, back, batch)[0],
                     diffs(ours, base, batch)[0])
    return out


TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]


def peft_lora(base, kind: str, rank: int):
    """A PEFT LoRA / DoRA model with random non-zero B."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, use_dora=kind == "peft_dora",
                          target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return theirs


def peft_adalora(base, rank: int):
    """A PEFT AdaLoRA model trained over SCHEDULE (init_r = 2 x rank) on a made-up loss,
    pruned by PEFT's own `update_and_allocate`."""
    import peft

    cfg = peft.AdaLoraConfig(init_r=2 * rank, target_r=SCHEDULE.target_rank, lora_alpha=rank,
                             target_modules=TARGETS, total_step=SCHEDULE.total_steps,
                             tinit=SCHEDULE.tinit, tfinal=SCHEDULE.tfinal,
                             deltaT=SCHEDULE.delta_t)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, SCHEDULE.total_steps + 1):
        theirs(**make_batch(base.config, 8, 200 + step)).square().mean().backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    return theirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="DT preset: tiny | small | paper")
    p.add_argument("--kind", default="dora", choices=KINDS, help="kind of the 10 timed adapters")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    base = DecisionTransformer(DTConfig.preset(args.preset, state_dim=39, act_dim=4)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t = time_ten(base, args.kind, args.rank, Path(tmp), args.repeats)
        f = fidelity(base, args.rank, Path(tmp))
    print(f"DT preset {args.preset}, rank {args.rank}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    print(f"10 CW10 {args.kind} adapters: export {t['export_s']:.3f} s "
          f"({t['export_s'] / 10 * 1e3:.1f} ms each), PEFT load {t['load_s']:.3f} s "
          f"({t['load_s'] / 10 * 1e3:.1f} ms each), max action diff {t['max_action_diff']:.2e}")
    print("| kind | direction | max abs actions diff | hidden diff | round trip | adapter "
          "effect |")
    print("|---|---|---|---|---|---|")
    for kind, (act, hid, trip, effect) in f.items():
        direction = "PEFT save -> import_peft" if kind in PEFT_KINDS else "export_peft -> PEFT"
        print(f"| {kind} | {direction} | {act:.2e} | {hid:.2e} | {trip:.2e} | {effect:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
