"""Hooks into the training loop, as Stable-Baselines3's ``BaseCallback`` does it.

    class PrintLoss(Callback):
        name = "print_loss"
        def on_step_end(self, trainer):
            print(trainer.step, trainer.history[-1][1])

    Trainer(model, sampler, config, callbacks=[PrintLoss()]).train()

The loop calls, in order: ``on_train_start`` once; per update ``on_step_start`` (before the
batch is drawn; ``trainer.step`` updates are done), ``on_optimizer_step`` (right after
``optimizer.step()``, while the gradients are still there), ``on_step_end`` (the update is
counted, before that step's checkpoint is written); ``on_train_end`` once when every update
is done (also when a resumed run had nothing left to do). Whatever ``state_dict`` returns
(tensors, numbers, strings, lists, dicts) is saved in every checkpoint under the
callback's ``name`` and handed to ``load_state_dict`` on resume, so a resumed run carries on
where the interrupted one was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eva_rl.training.trainer import Trainer


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    name: str = ""
    """Key of this callback's state in checkpoints (unique among a trainer's callbacks)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first update of this call of ``train`` (after a resume's restore)."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each update (``trainer.step`` updates are done)."""

    def on_optimizer_step(self, trainer: Trainer) -> None:
        """After ``optimizer.step()``, before the gradients are cleared."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each update (``trainer.step`` counts it), before its checkpoint."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When ``trainer.step == config.steps``."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (default: nothing)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``state_dict``."""


class StepHook(Callback):
    """Calls ``fn(step)`` before every update (e.g. to stop a run at a chosen point)."""

    name = "step_hook"

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_step_start(self, trainer: Trainer) -> None:
        self.fn(trainer.step)
