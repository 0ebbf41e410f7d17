"""Meta-World task suites as plain data, and task-name resolution.

Names are Meta-World 3.1 ``"<name>-v3"`` strings. Users may type bare names or the
``-v1`` / ``-v2`` names of older papers (the tasks are the same); :func:`resolve_task`
maps all of them to ``-v3``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

# Continual World's order (Wołczyk et al. 2021).
CW10: tuple[str, ...] = (
    "hammer-v3",
    "push-wall-v3",
    "faucet-close-v3",
    "push-back-v3",
    "stick-pull-v3",
    "handle-press-side-v3",
    "push-v3",
    "shelf-place-v3",
    "window-close-v3",
    "peg-unplug-side-v3",
)

CW20: tuple[str, ...] = CW10 + CW10

# All 50 tasks, in Meta-World's own (MT50) order.
MT50: tuple[str, ...] = (
    "assembly-v3",
    "basketball-v3",
    "bin-picking-v3",
    "box-close-v3",
    "button-press-topdown-v3",
    "button-press-topdown-wall-v3",
    "button-press-v3",
    "button-press-wall-v3",
    "coffee-button-v3",
    "coffee-pull-v3",
    "coffee-push-v3",
    "dial-turn-v3",
    "disassemble-v3",
    "door-close-v3",
    "door-lock-v3",
    "door-open-v3",
    "door-unlock-v3",
    "hand-insert-v3",
    "drawer-close-v3",
    "drawer-open-v3",
    "faucet-open-v3",
    "faucet-close-v3",
    "hammer-v3",
    "handle-press-side-v3",
    "handle-press-v3",
    "handle-pull-side-v3",
    "handle-pull-v3",
    "lever-pull-v3",
    "pick-place-wall-v3",
    "pick-out-of-hole-v3",
    "pick-place-v3",
    "plate-slide-v3",
    "plate-slide-side-v3",
    "plate-slide-back-v3",
    "plate-slide-back-side-v3",
    "peg-insert-side-v3",
    "peg-unplug-side-v3",
    "soccer-v3",
    "stick-push-v3",
    "stick-pull-v3",
    "push-v3",
    "push-wall-v3",
    "push-back-v3",
    "reach-v3",
    "reach-wall-v3",
    "shelf-place-v3",
    "sweep-into-v3",
    "sweep-v3",
    "window-open-v3",
    "window-close-v3",
)

# The 40 tasks not in CW10 (the EVA / L2M pretraining set), in the papers' order.
MT40: tuple[str, ...] = (
    "reach-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "door-close-v3",
    "reach-wall-v3",
    "pick-place-wall-v3",
    "button-press-v3",
    "button-press-topdown-wall-v3",
    "button-press-wall-v3",
    "disassemble-v3",
    "plate-slide-v3",
    "plate-slide-side-v3",
    "plate-slide-back-v3",
    "plate-slide-back-side-v3",
    "handle-press-v3",
    "handle-pull-v3",
    "handle-pull-side-v3",
    "stick-push-v3",
    "basketball-v3",
    "soccer-v3",
    "faucet-open-v3",
    "coffee-push-v3",
    "coffee-pull-v3",
    "coffee-button-v3",
    "sweep-v3",
    "sweep-into-v3",
    "pick-out-of-hole-v3",
    "assembly-v3",
    "lever-pull-v3",
    "dial-turn-v3",
    "bin-picking-v3",
    "box-close-v3",
    "hand-insert-v3",
    "door-lock-v3",
    "door-unlock-v3",
)

SUITES: dict[str, tuple[str, ...]] = {"CW10": CW10, "CW20": CW20, "MT40": MT40, "MT50": MT50}

_BARE_NAMES = tuple(t[: -len("-v3")] for t in MT50)
_VERSION = re.compile(r"-v[123]$")


def _closest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return ", ".join(close) if close else "none close"


def resolve_task(name: str) -> str:
    """Map ``hammer`` / ``hammer-v1`` / ``hammer-v2`` / ``hammer-v3`` to ``"hammer-v3"``.

    Case, surrounding spaces and underscores for hyphens are forgiven. An unknown name
    raises ``ValueError`` naming the closest valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    bare = _VERSION.sub("", name.strip().lower().replace("_", "-"))
    if bare in _BARE_NAMES:
        return f"{bare}-v3"
    raise ValueError(
        f"unknown Meta-World task {name!r}; closest valid names: "
        f"{_closest(bare, _BARE_NAMES)} (all 50 are in envs.MT50)"
    )


def resolve_tasks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve a suite name, a comma-separated list, or a list mixing both, to task names.

    Order is kept. A suite is appended whole (so ``"CW20"`` keeps its repeats); a task
    named on its own is skipped when it is already in the list.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    pieces = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    if not pieces:
        raise ValueError(f"no tasks given in {spec!r}")
    suites = {k.lower(): v for k, v in SUITES.items()}
    out: list[str] = []
    for piece in pieces:
        if piece.lower() in suites:
            out.extend(suites[piece.lower()])
            continue
        try:
            task = resolve_task(piece)
        except ValueError as err:
            raise ValueError(
                f"{err}; or a suite: {', '.join(SUITES)} (closest: "
                f"{_closest(piece.upper(), list(SUITES))})"
            ) from None
        if task not in out:
            out.append(task)
    return tuple(out)
