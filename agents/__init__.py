"""Things that act and learn in Meta-World: the DT agent (told the task, or routed:
`RoutedAgent`), experts, evaluation, protocols.

    from agents import DTAgent, evaluate
    agent = DTAgent.load("runs/pretrain-small")
    print(evaluate(agent, ["hammer-v3"], n_episodes=10)["hammer-v3"]["success_rate"])

Names are imported on first use, so a collection worker that needs only the experts does
not pay for importing the model stack.
"""

from __future__ import annotations

from agents.lazy import lazy_exports

_EXPORTS = {
    "DTAgent": "agents.dt_agent",
    "RoutedAgent": "agents.routed_agent",
    "evaluate": "agents.evaluation",
    "run_episodes": "agents.evaluation",
    "ScriptedExpert": "agents.experts",
    "ScriptedCollector": "agents.experts",
    "SACCollector": "agents.experts",
    "collect_datasets": "agents.collection",
    "METHODS": "agents.methods",
    "get_method": "agents.methods",
    "FinetuneConfig": "agents.finetune_config",
    "CONFIGS": "agents.finetune_config",
    "finetune_task": "agents.finetune",
    "Experiment": "agents.protocols",
    "run_experiment": "agents.protocols",
    "write_report": "agents.reports",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
