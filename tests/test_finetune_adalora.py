"""AdaLoRA in fine-tuning: ranks pruned to the target, the allocator's state survives an
interruption exactly, the rank schedule reaches tensorboard."""

import pytest
from helpers import TASKS, Interrupt, comparable, experiment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.protocols import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_adalora_prunes_to_the_target_and_resumes_exactly(setup, tmp_path):
    exp = experiment(setup, protocol="single", methods=("adalora",), steps=12,
                     checkpoint_every=4, log_every=2, adalora_delta_t=2)
    full = run_experiment(exp, tmp_path / "full", report=False)
    for rec in full["runs"][0]["per_task"]:
        ranks = rec["adalora_ranks"]
        # 4 * 1.5 = 6 per layer at the start, pruned to an average of 4 by the end
        assert ranks and sum(ranks.values()) == 4 * len(ranks)
        assert max(ranks.values()) <= 6 and len(set(ranks.values())) > 1  # unequal ranks

    def stop(task, step):  # in the budget phase, after the checkpoint at 4
        if task == TASKS[1] and step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(exp, tmp_path / "cut", hook=stop, report=False)
    resumed = run_experiment(exp, tmp_path / "cut", resume=True, report=False)
    assert comparable(resumed) == comparable(full)

    tb = tmp_path / "full/runs/adalora/seed_0/00_faucet-close-v3/train/tb"
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "adalora/rank_total" in tags and any(t.startswith("adalora/rank/") for t in tags)
    totals = [e.value for e in events.Scalars("adalora/rank_total")]
    assert totals[0] > totals[-1]  # the schedule shrinks the budget
