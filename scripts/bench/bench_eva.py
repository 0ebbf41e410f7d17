r"""Benchmark EVA's initialisation: solvers, against PEFT's EVA, against one full SVD, its share
of a task's fine-tuning time, and the Theorem 3.2 check (EVA vs LoRA init at the first steps).

Every comparison runs side by side in one process, interleaved, repeated; medians are printed
with ratios. Runs on CUDA when present (`--device auto`), else CPU. Without `--data` the
windows are synthetic (random states with a low-rank structure, actions a fixed function of
the states); without `--run` the DT has random weights (no pretrained model) -- both are said
in the output.

    .venv/bin/python scripts/bench/bench_eva.py --repeats 3
    .venv/bin/python scripts/bench/bench_eva.py --sections peft,full --data data/cw10 \\
        --task hammer-v3 --run runs/pretrain
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from agents.finetune_config import CONFIGS
from eva_rl.adapters import AdapterConfig, add_adapter
from eva_rl.eva import (
    ActivationCollector,
    EvaConfig,
    apply_eva,
    compute_eva,
    dt_forward_and_mask,
    find_target_layers,
)
from eva_rl.eva.incremental_svd import decompose
from eva_rl.models import DecisionTransformer, DTConfig

from common import NOISY, median, set_threads, timed

SECTIONS = ("solvers", "peft", "full", "share", "theorem")


def synthetic_batches(cfg: DTConfig, n: int, b: int, device, seed=0, mix=None):
    """Windows whose states live near a 6-d subspace and whose actions are tanh(M s)."""
    g = torch.Generator().manual_seed(seed)
    gm = torch.Generator().manual_seed(1234)
    basis = torch.randn(6, cfg.state_dim, generator=gm)
    m = torch.randn(cfg.state_dim, cfg.act_dim, generator=gm) / math.sqrt(cfg.state_dim)
    k = cfg.context_len
    out = []
    for _ in range(n):
        s = torch.randn(b, k, 6, generator=g) @ basis + 0.1 * torch.randn(b, k, cfg.state_dim,
                                                                           generator=g)
        a = torch.tanh(s @ m)
        r = torch.rand(b, k, 1, generator=g)
        rtg = r.flip(1).cumsum(1).flip(1)
        t0 = torch.randint(0, 150, (b, 1), generator=g)
        out.append({"states": s, "actions": a, "rewards": r, "returns_to_go": rtg,
                    "timesteps": t0 + torch.arange(k), "mask": torch.ones(b, k, dtype=torch.bool)})
    return [{key: v.to(device) for key, v in x.items()} for x in out]


def real_batches(args, cfg: DTConfig, n: int, b: int, device, seed=0):
    from eva_rl.data import WindowSampler, compute_state_stats, open_dataset

    ds = open_dataset(f"{args.data}/{args.task}")
    mean, std = compute_state_stats([ds])
    sampler = WindowSampler([ds], cfg.context_len, reward_scale=cfg.reward_scale,
                            state_mean=mean, state_std=std, seed=seed)
    return [{k: torch.as_tensor(v, device=device) for k, v in sampler.sample(b).items()}
            for _ in range(n)]


def make_batches(args, cfg, n, b, device, seed=0):
    if args.data:
        return real_batches(args, cfg, n, b, device, seed)
    return synthetic_batches(cfg, n, b, device, seed)


def make_model(args, preset: str, device) -> DecisionTransformer:
    if args.run and preset == args.preset:
        from eva_rl.training.run import load_weights, read_run_config

        cfg = DTConfig.from_dict(read_run_config(args.run)["model"])
        model = load_weights(DecisionTransformer(cfg), f"{args.run}/model.safetensors")
    else:
        torch.manual_seed(0)
        model = DecisionTransformer(DTConfig.preset(preset, dropout=0.0))
    return model.to(device).eval()


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return float(torch.linalg.svdvals(qa.T @ qb).min())


def bench_solvers(args, device):
    """Time one incremental update (k + rows + 1, d) per solver; batched vs per-layer loop."""
    print("\n## solvers: one incremental-SVD update (ms, median), k = r*rho components")
    k = round(args.rank * args.rho)
    print("| d | rows | exact | lowrank | gram | best | 6 layers batched: loop/batched "
          "gram, lowrank |")
    print("|---|---|---|---|---|---|---|")
    for d in args.solver_dims:
        for rows in args.solver_rows:  # 640, 2560: an EVA batch of 8 or 32 small-DT windows
            m = torch.randn(rows + k + 1, d, device=device)
            mb = torch.randn(6, rows + k + 1, d, device=device)
            times = {s: [] for s in ("exact", "lowrank", "gram")}
            batched = {s: ([], []) for s in ("gram", "lowrank")}
            for _ in range(args.repeats + 1):  # the first round is a warm-up
                for s in times:
                    times[s].append(timed(lambda s=s, m=m: decompose(m, k, s), device)[0])
                for s in batched:
                    batched[s][0].append(
                        timed(lambda s=s, mb=mb: decompose(mb, k, s), device)[0])
                    batched[s][1].append(timed(
                        lambda s=s, mb=mb: [decompose(x, k, s) for x in mb], device)[0])
            t = {s: median(v[1:]) * 1e3 for s, v in times.items()}
            ratio = ", ".join(f"{median(batched[s][1][1:]) / median(batched[s][0][1:]):.2f}x"
                              for s in batched)
            print(f"| {d} | {rows} | {t['exact']:.2f} | {t['lowrank']:.2f} | {t['gram']:.2f} | "
                  f"{min(t, key=t.get)} | {ratio} |")


def peft_eva(model, batches, targets, args, forward):
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig as PeftEvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    cfg = LoraConfig(r=args.rank, target_modules=list(targets), init_lora_weights="eva",
                     eva_config=PeftEvaConfig(rho=args.rho, tau=args.tau))
    return get_eva_state_dict(model, batches, cfg, forward_fn=forward,
                              prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                              show_progress_bar=False)


def bench_peft(args, device, model, batches):
    print(f"\n## EVA init vs PEFT {peft_version()} get_eva_state_dict ({args.preset} DT, "
          f"r={args.rank}, rho={args.rho}, tau={args.tau}, {args.batch_size} windows/batch, "
          f"same batches, no token mask in either)")
    forward, _ = dt_forward_and_mask(model)
    targets = find_target_layers(model, ("blocks.*",))
    ours_t, peft_t, ours_res, theirs = [], [], None, None
    cfg = EvaConfig(rank=args.rank, rho=args.rho, tau=args.tau, max_batches=len(batches) * 20)
    for _ in range(args.repeats):
        # PEFT cycles its loader until convergence: give ours the same (cycled) sequence
        t, ours_res = timed(lambda: compute_eva(model, itertools.cycle(batches), cfg, forward),
                            device)
        ours_t.append(t)
        t, theirs = timed(lambda: peft_eva(model, batches, targets, args, forward), device)
        peft_t.append(t)
    ratio = median(peft_t) / median(ours_t)
    a = ours_res.lora_A()
    same_rank = sum(a[p].shape[0] == theirs[p].shape[0] for p in targets)
    cos = []
    for p in targets:
        n = min(a[p].shape[0], theirs[p].shape[0])
        if n:
            cos.append(float((a[p][:n].double() * theirs[p][:n].double()).sum(1).abs().min()))
    print(f"ours (svd=auto): median {median(ours_t):.3f}s over {args.repeats} "
          f"({ours_res.batches_used} batches, {ours_res.stop_reason}); "
          f"PEFT: median {median(peft_t):.3f}s  ->  ours is {ratio:.2f}x faster")
    print(f"agreement: {same_rank}/{len(targets)} layers same rank (ties between q/k/v may "
          f"swap), min |cos| of matching components {min(cos):.4f}")
    return ours_res


def bench_full(args, device, model, batches, result):
    print("\n## EVA vs one full SVD of all collected activations (the batches EVA used)")
    forward, _ = dt_forward_and_mask(model)
    used = batches[: result.batches_used] if result.batches_used <= len(batches) else \
        list(itertools.islice(itertools.cycle(batches), result.batches_used))
    leaders = sorted({result.shared[p] for p in result.paths}, key=result.paths.index)
    eva_t, full_t = [], []
    for _ in range(args.repeats):
        cfg = EvaConfig(rank=args.rank, rho=args.rho, tau=args.tau,
                        max_batches=result.batches_used)
        t, res = timed(lambda cfg=cfg: compute_eva(model, used, cfg, forward), device)
        eva_t.append(t)

        def full():
            col = ActivationCollector(model, leaders, gather=False)
            rows = {p: [] for p in leaders}
            for p in leaders:
                col.attach(p)
            with torch.no_grad():
                for b in used:
                    forward(model, b)
                    for p, x in col.pop().items():
                        rows[p].append(x)
            col.close()
            out = {}
            for p in leaders:
                x = torch.cat(rows[p])
                x = x - x.mean(0)
                out[p] = torch.linalg.svd(x, full_matrices=False)[2]
            return out, x.shape[0]

        t, (vt, n_rows) = timed(full, device)
        full_t.append(t)
    cos_k, cos_r = [], []
    for p in leaders:
        k = res.components[p].shape[0]
        cos_k.append(subspace_cos(res.components[p], vt[p][:k]))
        r = max(res.ranks[m] for m in res.paths if res.shared[m] == p)
        if r:
            cos_r.append(subspace_cos(res.components[p][:r], vt[p][:r]))
    print(f"EVA (incremental, with convergence): median {median(eva_t):.3f}s; full SVD of "
          f"{n_rows} rows per layer (collect + svd): median {median(full_t):.3f}s -> "
          f"ratio full/EVA {median(full_t) / median(eva_t):.2f}x")
    print(f"subspace similarity (min cos of principal angles) over {len(leaders)} decompositions:"
          f" top r*rho: min {min(cos_k):.4f} median {median(cos_k):.4f}; allocated top rank_i: "
          f"min {min(cos_r):.4f} median {median(cos_r):.4f}")


def step_time(model, batches, device, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        b = batches[i % len(batches)]

        def step(b=b):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.25)
            opt.step()

        times.append(timed(step, device)[0])
    model.eval()
    return median(times[1:])


def bench_share(args, device):
    print("\n## EVA init as a share of one task's fine-tuning time "
          "(agents.finetune_config.CONFIGS)")
    if not args.only_paper:
        share_one(args, device, args.preset, "cpu")
    if not args.skip_paper:
        share_one(args, device, "paper", "paper")


def share_one(args, device, preset: str, name: str) -> None:
    ft = CONFIGS[name]
    model = make_model(args, preset, device)
    cfg = model.config
    eva_b = args.paper_eva_batch if device.type == "cpu" and preset == "paper" else \
        ft.eva.batch_size
    batches = make_batches(args, cfg, min(ft.eva.max_batches, 60), eva_b, device, seed=1)
    forward, mask_fn = dt_forward_and_mask(model)
    ecfg = EvaConfig(rank=ft.adapter.rank, rho=ft.eva.rho, tau=ft.eva.tau,
                     max_batches=ft.eva.max_batches, alpha=ft.adapter.alpha)
    eva_t = []
    for _ in range(args.repeats):
        t, res = timed(lambda: compute_eva(model, batches, ecfg, forward, mask_fn), device)
        eva_t.append(t)
    apply_eva(model, "task", res, AdapterConfig(method="lora", rank=ft.adapter.rank,
                                                    alpha=ft.adapter.alpha))
    train_b, scale = ft.train.batch_size, 1.0
    if device.type == "cpu" and preset == "paper":  # batch 128 x 200 tokens: too slow here
        train_b, scale = args.paper_train_batch, ft.train.batch_size / args.paper_train_batch
    tb = make_batches(args, cfg, 4, train_b, device, seed=2)
    st = step_time(model, tb, device, args.steps) * scale
    total = st * ft.train.steps
    share = median(eva_t) / (median(eva_t) + total)
    note = f" (timed at batch {train_b}, x{scale:g} assumed linear)" if scale != 1 else ""
    print(f"{preset} DT ({model.num_parameters() / 1e6:.2f}M params), fine-tuning config "
          f"{name!r}: EVA {median(eva_t):.3f}s ({res.batches_used} batches of {eva_b} windows, "
          f"{res.stop_reason}); train step {st * 1e3:.1f} ms{note} x {ft.train.steps} steps = "
          f"{total:.1f}s -> EVA share {100 * share:.3f}% (paper 0.2-0.7%, goal <= 0.5%)")
    if name != "paper":
        long = CONFIGS["paper"].train.steps
        print(f"  the same step time x the paper's {long} steps: EVA share "
              f"{100 * median(eva_t) / (median(eva_t) + st * long):.4f}%")


def bench_theorem(args, device):
    print("\n## Theorem 3.2 in practice: EVA vs LoRA init (uniform rank r, rho = 1, B = 0)")
    print("data:", f"{args.data}/{args.task}" if args.data else "SYNTHETIC windows (no CW10 "
          "data given)", "| model:", args.run or "RANDOM-INIT DT (no pretrained run given)")
    base = make_model(args, args.preset, device)
    cfg = base.config
    eva_batches = make_batches(args, cfg, 30, args.batch_size, device, seed=3)
    train = make_batches(args, cfg, args.k_steps, 32, device, seed=4)
    forward, mask_fn = dt_forward_and_mask(base)
    res = compute_eva(base, eva_batches, EvaConfig(rank=args.rank, rho=1.0, tau=args.tau),
                      forward, mask_fn)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {}
    for init in ("eva", "lora", "lora-unit-rows"):
        gnorms, losses = [], []
        for seed in range(args.theorem_seeds):
            model = DecisionTransformer(cfg).to(device)
            model.load_state_dict(state)
            torch.manual_seed(seed)
            ac = AdapterConfig(method="lora", rank=args.rank, alpha=float(args.rank))
            if init == "eva":
                apply_eva(model, "t", res, ac)
            else:
                add_adapter(model, "t", ac)
                if init == "lora-unit-rows":  # random directions with EVA's row norm (1)
                    with torch.no_grad():
                        for m in model.modules():
                            if hasattr(m, "lora_A") and "t" in m.lora_A:
                                m.lora_A["t"].div_(m.lora_A["t"].norm(dim=1, keepdim=True))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=args.lr)
            model.train()
            for i, b in enumerate(train):
                opt.zero_grad(set_to_none=True)
                loss = model.loss(b)
                loss.backward()
                if i == 0:
                    gnorms.append(float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
                opt.step()
            model.eval()
            with torch.no_grad():
                losses.append(float(sum(model.loss(b) for b in train[-4:]) / 4))
        results[init] = (median(gnorms), median(losses))
    e_g, e_l = results["eva"]
    for init, (g, loss) in results.items():
        print(f"{init:>15}: grad norm at step 1 {g:.4e} (EVA/this {e_g / g:.2f}x); loss after "
              f"{args.k_steps} steps {loss:.5f} (this/EVA {loss / e_l:.3f})")


def peft_version() -> str:
    import peft

    return peft.__version__


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--preset", default="small", help="DT preset for the PEFT/full/theorem parts")
    p.add_argument("--solver-dims", type=int, nargs="+", default=[32, 128, 512],
                   help="solvers: layer input widths d")
    p.add_argument("--solver-rows", type=int, nargs="+", default=[640, 2560],
                   help="solvers: activation rows per update")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--batch-size", type=int, default=16, help="windows per EVA batch")
    p.add_argument("--n-batches", type=int, default=40, help="distinct EVA batches")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median)")
    p.add_argument("--k-steps", type=int, default=30, help="fine-tuning steps (theorem check)")
    p.add_argument("--theorem-seeds", type=int, default=2, help="LoRA seeds (theorem check)")
    p.add_argument("--lr", type=float, default=1e-3, help="adapter lr (theorem check)")
    p.add_argument("--paper-eva-batch", type=int, default=4, help="CPU only: paper EVA batch")
    p.add_argument("--paper-train-batch", type=int, default=8, help="CPU only: timed batch")
    p.add_argument("--skip-paper", action="store_true", help="skip the paper-preset share")
    p.add_argument("--only-paper", action="store_true", help="share: only the paper preset")
    p.add_argument("--data", default=None, help="dataset root (with --task); default synthetic")
    p.add_argument("--task", default="hammer-v3")
    p.add_argument("--run", default=None, help="pretrained run dir; default random-init DT")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    set_threads(args.threads)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; valid: {SECTIONS}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_eva on {device} ({name}); torch {torch.__version__}; medians of "
          f"{args.repeats}; data: {'real ' + args.task if args.data else 'synthetic'}")
    if device.type == "cpu":
        print(f"(CPU {NOISY})")
    torch.manual_seed(0)
    if "solvers" in sections:
        bench_solvers(args, device)
    result = None
    if "peft" in sections or "full" in sections:
        model = make_model(args, args.preset, device)
        batches = make_batches(args, model.config, args.n_batches, args.batch_size, device)
        if "peft" in sections:
            result = bench_peft(args, device, model, batches)
        if "full" in sections:
            if result is None:
                forward, _ = dt_forward_and_mask(model)
                result = compute_eva(model, itertools.cycle(batches), EvaConfig(
                    rank=args.rank, rho=args.rho, tau=args.tau, max_batches=400), forward)
            bench_full(args, device, model, batches, result)
    if "share" in sections:
        bench_share(args, device)
    if "theorem" in sections:
        bench_theorem(args, device)


if __name__ == "__main__":
    main()
