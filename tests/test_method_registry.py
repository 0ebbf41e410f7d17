"""A method is one `register_method` call: a small extra method, registered in this file
alone, runs through the fine-tuning experiment end to end like the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import TASKS, experiment

from agents.initializers import InitOutcome
from agents.methods import METHODS, Method, get_method, register_method
from agents.protocols import run_experiment
from eva_rl.adapters import AdapterConfig, adapter_layers, add_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class OrthonormalInit:
    """A test initializer: LoRA with ``A``'s rows a seeded orthonormal basis."""

    name: str = "orthonormal"
    min_rho: float = 1.0
    calls: list[str] = field(default_factory=list)
    initial_A: dict[str, torch.Tensor] = field(default_factory=dict)

    def attach(self, agent, task, dataset, adapter_config: AdapterConfig, config, seed: int,
               task_dir: Path) -> InitOutcome:
        add_adapter(agent.model, task, adapter_config)
        g = torch.Generator().manual_seed(seed)
        ranks = {}
        for path, layer in adapter_layers(agent.model).items():
            if task not in getattr(layer, "lora_A", {}):
                continue
            a = layer.lora_A[task]
            q, _ = torch.linalg.qr(torch.randn(a.shape[1], a.shape[0], generator=g))
            with torch.no_grad():
                a.copy_(q.T)
            self.initial_A[f"{task}/{path}"] = a.detach().clone()
            ranks[path] = a.shape[0]
        self.calls.append(task)
        return InitOutcome(seconds=0.0, ranks=ranks)


@pytest.fixture
def orthonormal_lora():
    init = OrthonormalInit()
    method = register_method(Method("orthonormal_lora", "lora", init,
                                    description="test: LoRA with an orthonormal A"))
    yield method
    del METHODS[method.name]


def test_names_are_registered_once_and_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("lora", "lora"))
    with pytest.raises(ValueError, match="lower case"):
        register_method(Method("My Method", "lora"))
    assert get_method("eva").eva and not get_method("lora").eva
    assert get_method("eva_reverse").min_rho == 2.0 and get_method("eva").min_rho == 1.0


@pytest.mark.slow
def test_a_method_registered_in_a_test_runs_end_to_end(setup, tmp_path, orthonormal_lora):
    init = orthonormal_lora.initializer
    exp = experiment(setup, protocol="single", methods=("lora", orthonormal_lora.name),
                     steps=2, eval_every=0, eval_at_start=False, eval_episodes=1)
    results = run_experiment(exp, tmp_path / "run", report=False)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"lora", "orthonormal_lora"}
    assert sorted(init.calls) == sorted(TASKS)  # once per task, by the registered initializer
    for a in init.initial_A.values():  # what it set: orthonormal rows
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    mine, lora = runs["orthonormal_lora"]["per_task"], runs["lora"]["per_task"]
    assert [r["task"] for r in mine] == list(TASKS)
    assert [r["trainable_params"] for r in mine] == [r["trainable_params"] for r in lora]
    assert all(r["eva_ranks"] for r in mine)  # the ranks the initializer reported
    # it trained: the record's first gradient differs from LoRA's (another A)
    assert mine[0]["first_grad_norm"] != lora[0]["first_grad_norm"]
