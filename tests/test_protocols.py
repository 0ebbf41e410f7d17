"""Tiny end to end: scripted-expert data, a tiny pretrained DT, fine-tuning protocols,
interruption + resume, and the bad-input errors of `run_experiment` and scripts/finetune.py."""

import json

import numpy as np
import pytest
import torch
from helpers import TASKS, Interrupt, comparable, experiment, run_main, tiny_config

from agents.protocols import Experiment, run_experiment
from eva_rl.data import DatasetError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_sequential_interrupt_and_resume_matches(setup, tmp_path):
    exp = experiment(setup)
    full = run_experiment(exp, tmp_path / "full", report=False)
    run = full["runs"][0]
    assert len(run["per_task"]) == 2
    S = np.asarray(run["success_matrix"])
    assert S.shape == (2, 2) and np.all((S >= 0) & (S <= 1))
    rec = run["per_task"][1]
    assert rec["trainable_params"] > 0 and rec["first_grad_norm"] > 0
    assert rec["eva_ranks"] and sum(rec["eva_ranks"].values()) == 4 * len(rec["eva_ranks"])
    assert rec["loss_curve"]["steps"] == [2, 4, 6]
    assert 0 < rec["eva_share"] < 1 and rec["eva_seconds"] > 0
    # the second task's adapter sits next to the first one's on the frozen base
    assert (tmp_path / "full/runs/eva_dora/seed_0/00_faucet-close-v3/adapter").is_dir()

    def stop(task, step):  # interrupt the second task after 3 updates (checkpoint at 2)
        if task == TASKS[1] and step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(exp, tmp_path / "cut", hook=stop, report=False)
    cut = tmp_path / "cut/runs/eva_dora/seed_0"
    assert (cut / "00_faucet-close-v3/record.json").is_file()
    assert not (cut / "01_window-close-v3/record.json").exists()
    assert (cut / "01_window-close-v3/train/checkpoints/step_2").is_dir()
    first = (cut / "00_faucet-close-v3/record.json").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(exp, tmp_path / "cut", report=False)
    resumed = run_experiment(exp, tmp_path / "cut", resume=True, report=False)
    assert (cut / "00_faucet-close-v3/record.json").read_text() == first  # not redone
    assert comparable(resumed) == comparable(full)
    saved = json.loads((tmp_path / "cut/results.json").read_text())
    assert saved["runs"][0]["success_matrix"] == run["success_matrix"]


@pytest.mark.slow
def test_single_fft_and_resume_with_other_settings(setup, tmp_path):
    exp = experiment(setup, protocol="single", methods=("fft", "lora"), eval_every=3,
                     eval_at_start=True, steps=3)
    res = run_experiment(exp, tmp_path / "single")
    fft, lora = res["runs"]
    assert fft["success_matrix"] is None and len(fft["per_task"]) == 2
    assert fft["per_task"][0]["trainable_params"] > 10 * lora["per_task"][0]["trainable_params"]
    curve = lora["per_task"][0]["success_curve"]
    assert curve["steps"] == [0, 3]
    assert lora["per_task"][0]["auc"] == pytest.approx(np.mean(curve["success"]))
    assert (tmp_path / "single/plots/success_per_task_single.png").is_file()
    other = experiment(setup, protocol="single", methods=("fft", "lora"), eval_every=3,
                       eval_at_start=True, steps=4)
    with pytest.raises(ValueError, match="steps: 3 -> 4"):
        run_experiment(other, tmp_path / "single", resume=True)


@pytest.mark.slow
def test_bad_input_is_refused_before_anything_is_written(setup, tmp_path):
    root, data, pre = setup

    def exp(**kw):
        args = {"pretrained": str(pre), "data": str(data), "tasks": TASKS,
                "methods": ("lora",), "config": tiny_config(steps=2), **kw}
        return Experiment(**args)

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="valid methods: fft, lora"):
        exp(methods=("lorra",))
    with pytest.raises(ValueError, match="hamer"):
        exp(tasks=("hamer",))
    with pytest.raises(DatasetError, match="missing"):
        run_experiment(exp(tasks=("reach",)), out)
    # a pretrained run whose dimensions do not fit the data
    bad = root / "bad-pre"
    bad.mkdir(exist_ok=True)
    cfg = json.loads((pre / "config.json").read_text())
    cfg["model"]["state_dim"] = 12
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((pre / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="dims"):
        run_experiment(exp(pretrained=str(bad)), out)
    assert not out.exists()  # nothing written on bad input
    # an existing run directory without resume / overwrite
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(exp(tasks=TASKS[:1]), out)
    assert (out / "keep.txt").read_text() == "precious"
    # overwrite moves the old run aside instead of deleting it
    run_experiment(exp(tasks=TASKS[:1]), out, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "keep.txt").read_text() == "precious"
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_finetune_script_reports_bad_input_in_one_line(setup, tmp_path):
    _, data, pre = setup
    out = tmp_path / "run"
    done = run_main("finetune", [
        "--pretrained", str(pre), "--data", str(data), "--tasks", ",".join(TASKS),
        "--methods", "lorra", "--config", "quick", "--no-progress", "--out", str(out)])
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err
    assert err.startswith("error: ") and "\n" not in err and "valid methods: fft, lora" in err
    assert not out.exists()


def test_method_registry():
    from agents.methods import METHODS, get_method, parse_methods

    assert list(METHODS) == ["fft", "lora", "dora", "pissa", "olora", "adalora", "eva",
                             "eva_dora", "eva_reverse", "eva_state", "eva_type_centered",
                             "eva_lora_norm", "corda_ipm", "corda_kpm", "lora_ga"]
    assert [m.name for m in parse_methods("lora, EVA,lora")] == ["lora", "eva"]
    assert get_method("eva_dora").adapter == "dora" and get_method("eva_dora").eva
    assert get_method("fft").is_full
    with pytest.raises(ValueError, match="unknown method 'evaa'; valid methods: fft, lora"):
        get_method("evaa")


@pytest.mark.slow
def test_every_method_starts_from_the_pretrained_function(setup, tmp_path):
    """Each method's initialisation leaves the model's predictions unchanged (B = 0, or the
    PiSSA/OLoRA offset), trains only what it should, and EVA-reverse picks other components."""
    from agents.finetune import attach_method
    from agents.initializers import compute_or_load_eva
    from agents.methods import METHODS
    from agents.protocols import check_inputs, load_agent
    from eva_rl.data import WindowSampler

    exp = experiment(setup, protocol="single", methods=tuple(METHODS))
    datasets = check_inputs(exp)
    ds = datasets[TASKS[0]]
    cfg = exp.config
    counts = {}
    for name, method in METHODS.items():
        agent = load_agent(exp, datasets)
        batch = WindowSampler([ds], agent.config.context_len, state_mean=agent.state_mean,
                              state_std=agent.state_std, seed=1).sample(4)
        batch = {k: torch.as_tensor(v) for k, v in batch.items() if k != "task_index"}
        before = agent.model(**batch)
        counts[name], _, ranks, _ = attach_method(agent, TASKS[0], ds, method, cfg, 0,
                                                  tmp_path / name)
        torch.testing.assert_close(agent.model(**batch), before, atol=1e-5, rtol=1e-4)
        assert (ranks is not None) == method.eva
    assert counts["lora"] == counts["eva"] == counts["pissa"] == counts["olora"]
    assert counts["dora"] == counts["eva_dora"] > counts["lora"]
    assert counts["fft"] > 10 * counts["lora"]
    top, _ = compute_or_load_eva(load_agent(exp, datasets), ds, METHODS["eva"].initializer, cfg,
                                 0, tmp_path / "eva")
    low, _ = compute_or_load_eva(load_agent(exp, datasets), ds,
                                 METHODS["eva_reverse"].initializer, cfg, 0,
                                 tmp_path / "eva_reverse")
    assert low.config.rho == 2.0 and sum(low.ranks.values()) == sum(top.ranks.values())

    def captured(res, reverse):  # explained variance the kept components carry
        total = 0.0
        for layer, r in res.ranks.items():
            ratios = res.explained_variance_ratio[layer]
            total += float(ratios[len(ratios) - r:].sum() if reverse else ratios[:r].sum())
        return total

    for layer, r in low.ranks.items():  # the reverse run keeps each layer's last components
        k = low.components[layer].shape[0]
        torch.testing.assert_close(low.lora_A()[layer], low.components[layer][k - r:])
    assert captured(low, reverse=True) < 0.5 * captured(top, reverse=False)


@pytest.mark.slow
def test_sequential_fft_resume_restores_the_previous_task_weights(setup, tmp_path):
    exp = experiment(setup, methods=("fft",), steps=2, checkpoint_every=1, log_every=1)
    full = run_experiment(exp, tmp_path / "full", report=False)

    def stop(task, step):  # before the second task's first update: only task 0 is done
        if task == TASKS[1] and step == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(exp, tmp_path / "cut", hook=stop, report=False)
    resumed = run_experiment(exp, tmp_path / "cut", resume=True, report=False)
    assert comparable(resumed) == comparable(full)
    rec = resumed["runs"][0]["per_task"][1]
    assert rec["trainable_params"] == full["runs"][0]["per_task"][0]["trainable_params"]


def test_final_evaluation_with_more_episodes_ends_the_curve(setup, tmp_path):
    """``final_eval_episodes``: the last curve point (the task's success) and the
    sequential rows use that many episodes, with the seeds of a joint evaluation."""
    exp = experiment(setup, eval_every=3, eval_episodes=1, final_eval_episodes=3)
    run = run_experiment(exp, tmp_path / "run", report=False)["runs"][0]
    first, second = run["per_task"]
    assert second["success_curve"]["steps"] == [3, 6]
    assert second["final_episodes"] == 3
    assert second["success"] == second["success_curve"]["success"][-1]
    assert second["success"] in (0, 1 / 3, 2 / 3, 1)
    # the row after the task evaluates it on the same 3 episodes (the same env seeds)
    assert run["success_matrix"][1][1] == second["success"]
    assert first["final_episodes"] == 3 and len(run["success_matrix"][0]) == 2
    with pytest.raises(ValueError, match="final_eval_episodes must be >= 1"):
        tiny_config(final_eval_episodes=0)


def test_sequential_rows_reevaluate_only_the_task_whose_adapter_changed(setup, tmp_path,
                                                                        monkeypatch):
    import agents.protocols as protocols
    from agents.finetune import eval_seed
    from eva_rl.adapters import load_adapter

    calls = []
    evaluate = protocols.evaluate

    def counted(agent, tasks, **kw):
        calls.append((list(tasks), kw.get("slots")))
        return evaluate(agent, tasks, **kw)

    monkeypatch.setattr(protocols, "evaluate", counted)
    exp = experiment(setup, methods=("lora",), eval_episodes=3, max_episode_steps=40)
    run = run_experiment(exp, tmp_path / "run", report=False)["runs"][0]
    assert calls == [(list(TASKS), [0, 1]), ([TASKS[1]], [1])]  # row 1 keeps task 0's entry
    # told the tasks, the run computes no routing signature (scripts/signatures.py does)
    assert not list((tmp_path / "run/runs/lora/seed_0").glob("*/signature"))
    assert [rec["signature_seconds"] for rec in run["per_task"]] == [0.0, 0.0]

    # each row equals a whole joint evaluation of the adapters trained by then
    agent = protocols.load_agent(exp, protocols.check_inputs(exp))
    runs = tmp_path / "run/runs/lora/seed_0"
    for i, rec in enumerate(run["per_task"]):
        load_adapter(agent.model, runs / f"{i:02d}_{TASKS[i]}" / "adapter", name=TASKS[i])
        row = evaluate(agent, TASKS, n_episodes=3, seed=eval_seed(0), max_episode_steps=40,
                       progress=False, stop_on_success=exp.config.eval.stop_on_success)
        assert rec["success_row"] == [row[t]["success_rate"] for t in TASKS]
        assert rec["return_row"] == [row[t]["mean_return"] for t in TASKS]
