r"""Write the routing signatures of a fine-tuning run's adapters (agents.routing).

A fine-tuning run that routes (`--routing` other than oracle) writes each task's signature
next to its adapter (``<task_dir>/signature/``); one that does not writes none. This
computes them from the tasks' data on the frozen base, the way fine-tuning does, for a run
without them (to evaluate it with a router that needs them: eva, obs, embedding) or with
another `--rank` (components per layer; default the run's ``signature_rank``, i.e. its
adapter rank). Signatures that exist are kept unless `--overwrite` (each then replaced in
place, tensors and JSON written atomically).

Example (the routing figures at the bench tier, docs/benchmarks.md):
    python scripts/signatures.py --run runs/bench/single --method eva --seed 2 --rank 24 --overwrite
    python scripts/evaluate.py --run runs/bench/single --method eva --seed-run 2 \
        --tasks CW10 --routing eva --out r.json
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from agents.finetuned import write_signatures
from eva_rl.threads import DEFAULT_THREADS, THREADS_HELP, set_threads

from script_cli import ScriptParser, script_main


@script_main
def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="fine-tuning run directory")
    p.add_argument("--method", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--rank", type=int, default=None,
                   help="components per layer (default: the run's signature rank)")
    p.add_argument("--overwrite", action="store_true", help="replace existing signatures")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=THREADS_HELP)
    args = p.parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    written = write_signatures(args.run, args.method, args.seed, rank=args.rank,
                               force=args.overwrite, device="cpu")
    print(f"wrote {len(written)} signatures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
