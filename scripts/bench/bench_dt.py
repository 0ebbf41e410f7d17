"""Benchmark our Decision Transformer's training step against Hugging Face's on this machine.

One training step = forward + masked MSE on actions + backward + AdamW step, on random
left-padded batches. Compared, interleaved in the same process (medians over repeats):

- ``hf``: transformers' ``DecisionTransformerModel`` (GPT-2 blocks, SDPA attention, gelu)
  with the same width, depth, heads, MLP width (4x), dropout (also on attention weights),
  context and batch; 3 tokens per step (rtg, state, action) and 3 output heads;
- ``ours-3tok``: our DT with HF's 3-token layout (action predicted from the state token)
  and the same dropout everywhere: the like-for-like comparison;
- ``ours-3tok-noad``: the same without attention-weight dropout (``attn_dropout=0``), which
  lets torch use its fused attention kernel during training;
- ``ours``: our DT with the preset's own settings (4 tokens per step: state, rtg, action,
  reward), i.e. 4/3 of HF's sequence length;
- ``ours-bf16``: ``ours`` under ``torch.autocast("cpu", torch.bfloat16)``.

Peak memory: each implementation runs in a fresh subprocess that resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``) after building the model and batch, trains
2 steps and reads ``VmHWM``: the growth covers activations, gradients and AdamW state,
not the weights or the imports.

Example:
    python scripts/bench/bench_dt.py --presets small paper --repeats 5
    # smoke run (the test suite's): --presets tiny --repeats 1 --no-memory
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from eva_rl.models import DecisionTransformer, DTConfig

from common import interleaved, median, random_dt_batch, set_threads, torch_line

IMPLS = ("hf", "ours-3tok", "ours-3tok-noad", "ours", "ours-bf16")
BATCH = {"tiny": 32, "small": 64, "paper": 8}
STEPS = {"tiny": 10, "small": 2, "paper": 1}


def make_batch(cfg: DTConfig, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch, a quarter of it left-padded, starts within 200 steps."""
    return random_dt_batch(cfg, batch_size, seed, padded_share=0.25, max_start=200)


def build(impl: str, preset: str):
    """(model, step function) for one implementation."""
    torch.manual_seed(0)
    cfg = DTConfig.preset(preset)
    if impl == "hf":
        from transformers import DecisionTransformerConfig, DecisionTransformerModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its GPT-2 token-id warnings do not apply here

        hf_cfg = DecisionTransformerConfig(
            state_dim=cfg.state_dim, act_dim=cfg.act_dim, hidden_size=cfg.n_embd,
            max_ep_len=cfg.max_ep_len, action_tanh=True, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu",
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            n_positions=1024,
        )
        hf_cfg._attn_implementation = "sdpa"
        model = DecisionTransformerModel(hf_cfg)

        def loss_fn(b):
            _, preds, _ = model(
                states=b["states"], actions=b["actions"], rewards=b["rewards"],
                returns_to_go=b["returns_to_go"], timesteps=b["timesteps"],
                attention_mask=b["mask"].long(), return_dict=False,
            )
            m = b["mask"].float()
            return (((preds - b["actions"]) ** 2).mean(-1) * m).sum() / m.sum()
    else:
        if impl.startswith("ours-3tok"):
            attn = 0.0 if impl.endswith("noad") else cfg.dropout
            cfg = DTConfig.preset(preset, token_layout=("rtg", "state", "action"),
                                  predict_from="state", attn_dropout=attn)
        model = DecisionTransformer(cfg)
        loss_fn = model.loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    bf16 = impl.endswith("bf16")

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def memory_child(impl: str, preset: str) -> None:
    """Run in a fresh process: print the peak-RSS growth of 2 training steps, in MiB."""
    _, step = build(impl, preset)
    batch = make_batch(DTConfig.preset(preset), BATCH[preset])
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    for _ in range(2):
        step(batch)
    print(json.dumps({"peak_delta_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(impl: str, preset: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", impl, preset,
         "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_mib"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DT training step: ours vs Hugging Face")
    p.add_argument("--presets", nargs="+", default=["small", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--paper-bf16", action="store_true",
                   help="also time bf16 on the paper preset (slow on CPUs without bf16)")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "PRESET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    print(f"{torch_line()}; shared noisy machine: medians of {args.repeats} interleaved "
          "repeats; wall and process-CPU time per step")
    for preset in args.presets:
        cfg = DTConfig.preset(preset)
        impls = IMPLS if preset != "paper" or args.paper_bf16 else IMPLS[:-1]
        built = {impl: build(impl, preset) for impl in impls}
        batch = make_batch(cfg, BATCH[preset])
        n = STEPS[preset]
        wall, proc = interleaved(
            {impl: lambda step=step, b=batch, n=n: [step(b) for _ in range(n)]
             for impl, (_, step) in built.items()}, args.repeats)
        med = {impl: median(t) / n * 1e3 for impl, t in wall.items()}  # ms per step
        cmed = {impl: median(t) / n * 1e3 for impl, t in proc.items()}
        times = {impl: [t / n * 1e3 for t in ts] for impl, ts in wall.items()}
        mem = {} if args.no_memory else {impl: peak_memory(impl, preset) for impl in impls}
        print(f"\n{preset}: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, "
              f"context {cfg.context_len} steps, batch {BATCH[preset]}, dropout {cfg.dropout}")
        print(f"{'impl':<15} {'tokens':>6} {'params':>11} {'wall ms':>8} {'min-max':>12} "
              f"{'hf/this':>7} {'cpu ms':>8} {'hf/this':>7} {'peak MiB':>8}")
        for impl in impls:
            model = built[impl][0]
            n_tok = 3 if impl == "hf" or impl.startswith("ours-3tok") else 4
            params = sum(q.numel() for q in model.parameters())
            spread = f"{min(times[impl]):.0f}-{max(times[impl]):.0f}"
            peak = f"{mem[impl]:.0f}" if mem else "-"
            print(f"{impl:<15} {n_tok * cfg.context_len:>6} {params:>11,} {med[impl]:>8.0f} "
                  f"{spread:>12} {med['hf'] / med[impl]:>7.2f} {cmed[impl]:>8.0f} "
                  f"{cmed['hf'] / cmed[impl]:>7.2f} {peak:>8}")
        for name, m in (("wall", med), ("cpu", cmed)):
            print(f"{name} ratios: hf/ours-3tok {m['hf'] / m['ours-3tok']:.2f}, hf/ours-3tok-noad "
                  f"{m['hf'] / m['ours-3tok-noad']:.2f}, hf/ours {m['hf'] / m['ours']:.2f}"
                  + (f"; bf16/fp32 time (ours) {m['ours-bf16'] / m['ours']:.2f}"
                     if "ours-bf16" in m else ""))


if __name__ == "__main__":
    main()
