r"""Export the task adapters of a fine-tuning run in Hugging Face PEFT's adapter format.

Writes OUT/<method>/seed_<s>/<task>/ (adapter_config.json, adapter_model.safetensors and
eva_rl_export.json) for every finished task, or those of --tasks. Each loads with
`peft.PeftModel.from_pretrained(base, dir)` onto the run's pretrained Decision Transformer
(`DTAgent.load(<pretrained run>).model`). PiSSA / OLoRA adapters become rank-2r LoRAs;
AdaLoRA adapters are PEFT AdaLoRA adapters (pruned triplets dropped, the run's schedule in
the AdaLoraConfig).

Example:
    python scripts/export_peft.py --run runs/cw10-single --method eva --seed 0 \
        --out peft-adapters
    python scripts/export_peft.py --run runs/cw10-single --method dora --seed 0 \
        --tasks hammer,faucet-close --out peft-adapters --overwrite
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from agents.peft_export import export_run_adapters
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads

from script_cli import ScriptParser, script_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="fine-tuning run directory (scripts/finetune.py)")
    p.add_argument("--method", required=True, help="method of the run, e.g. lora, eva, eva_dora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help="comma list of tasks (default: all of the run's)")
    p.add_argument("--out", required=True, help="export root: OUT/<method>/seed_<s>/<task>/")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the exports in an existing non-empty OUT/<method>/seed_<s>")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    return p.parse_args(argv)


@script_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    t0 = time.perf_counter()
    written = export_run_adapters(args.run, args.method, args.seed, args.out,
                                  tasks=args.tasks, overwrite=args.overwrite)
    for task, path in written.items():
        print(f"{task}: {path}")
    print(f"{len(written)} adapters in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
