"""Our adapters in and out of Hugging Face PEFT's format: time and fidelity.

1. Time: 10 CW10-named adapters on one DT are exported with `export_peft`, then loaded by
   PEFT onto the base (`PeftModel.from_pretrained` for the first, `load_adapter` for the
   rest); total and per-adapter seconds (median of --repeats).
2. Fidelity, per adapter kind (random non-zero B so the adapter matters): the max absolute
   difference of the predicted actions (and of the last hidden states) between our model
   and PEFT's after export -> PEFT load (lora, dora, eva, pissa, olora), and after a PEFT
   adapter -> `save_pretrained` -> `import_peft` (peft_lora, peft_dora); then the full round
   trip back to where it started (ours -> PEFT -> PEFT's save -> ours; PEFT -> ours ->
   export -> PEFT), and how much the adapter moves the actions at all. float32.

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
    AdapterConfig,
    adapter_layers,
    add_adapter,
    export_peft,
    import_peft,
    set_active_adapter,
)
from eva_rl.eva import EvaConfig, apply_eva, compute_eva
from eva_rl.models.dt import DecisionTransformer, DTConfig

KINDS = ("lora", "dora", "eva", "pissa", "olora")
PEFT_KINDS = ("peft_lora", "peft_dora")


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
    """Non-zero B (and a perturbed A / magnitude) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        if name in layer.lora_A:
            for p in (layer.lora_A[name], layer.lora_B[name]):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].mul_(
                    torch.rand(layer.lora_magnitude_vector[name].shape, generator=g) + 0.5)


def add_kind(model, kind: str, name: str, rank: int, seed: int) -> EvaConfig | None:
    """Adapter `name` of `kind`; returns the EVA config for EVA."""
    if kind == "eva":
        eva = EvaConfig(rank=rank, rho=2.0, tau=0.99, max_batches=8)
        batches = (make_batch(model.config, 8, seed + i) for i in range(eva.max_batches))
        result = compute_eva(model, batches, eva)
        apply_eva(model, name, result, AdapterConfig(method="lora", rank=rank, alpha=rank))
    else:
        eva = None
        add_adapter(model, name, AdapterConfig(method=kind, rank=rank, alpha=float(rank)))
    randomize(model, name, seed)
    return eva


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
    for i, task in enumerate(tasks):
        add_kind(ours, kind, task, rank, seed=i)
    export_s, load_s = [], []
    for rep in range(repeats):
        out = root / f"ten{rep}"
        t0 = time.perf_counter()
        for task in tasks:
            export_peft(ours, task, out / task)
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
        eva = add_kind(ours, kind, "t", rank, seed=10 + i)
        export_peft(ours, "t", root / kind, eva=eva)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / kind).eval()
        theirs.save_pretrained(root / f"{kind}-peft")
        back = copy.deepcopy(base)
        import_peft(back, root / f"{kind}-peft", "t")
        out[kind] = (*diffs(ours, theirs, batch), diffs(ours, back, batch)[0],
                     diffs(ours, base, batch)[0])
    for kind in PEFT_KINDS:
        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, use_dora=kind == "peft_dora",
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj",
                                              "fc_in", "fc_out"])
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        theirs.save_pretrained(root / kind)
        ours = copy.deepcopy(base)
        import_peft(ours, root / kind, "t")
        export_peft(ours, "t", root / f"{kind}-ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / f"{kind}-ours").eval()
        theirs.eval()
        out[kind] = (*diffs(ours, theirs, batch), diffs(theirs, back, batch)[0],
                     diffs(ours, base, batch)[0])
    return out


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
