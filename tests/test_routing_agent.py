"""Routing end to end: a tiny sequential run with ``routing="eva"``, its report, the
`RoutedAgent` (act / predict / evaluate with every router) and scripts/evaluate.py."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from helpers import TASKS, experiment, run_script

from agents.evaluation import evaluate
from agents.finetuned import load_finetuned_agent, load_routed_agent
from agents.protocols import run_experiment
from agents.routed_agent import RoutedAgent
from agents.routing import ROUTERS, RouterConfig, load_signature, routing_summary
from eva_rl.routing import SignatureError, SignaturePool, TaskSignature

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def routed_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("routed") / "run"
    exp = experiment(setup, methods=("lora",), routing="eva", routing_after=2,
                     eval_episodes=2)
    results = run_experiment(exp, out)
    return out, results


def test_sequential_run_routes_and_reports(routed_run):
    out, results = routed_run
    run = results["runs"][0]
    S = np.asarray(run["success_matrix"])
    assert S.shape == (2, 2) and np.all((S >= 0) & (S <= 1))
    last = run["per_task"][-1]
    rt = last["routing"]
    assert rt["router"] == "eva" and rt["decide_after"] == 2
    assert set(rt["per_task"]) == set(TASKS) and 0 <= rt["accuracy"] <= 1
    assert rt["confusion"]["cols"] == [*TASKS, "none"]
    assert [sum(r) for r in rt["confusion"]["counts"]] == [2, 2]  # every episode counted
    assert len(last["oracle_success_row"]) == 2
    first = run["per_task"][0]["routing"]
    assert first["confusion"]["cols"] == [TASKS[0], "none"]  # only the first adapter yet
    for i, task in enumerate(TASKS):
        sig = out / f"runs/lora/seed_0/{i:02d}_{task}/signature"
        assert (sig / "signature.safetensors").is_file() and (sig / "signature.json").is_file()
    report = (out / "report.md").read_text()
    assert "## Routing — lora seed 0 (router `eva`" in report and "true \\ chosen" in report
    assert (out / "plots/routing_confusion_lora_seed0.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb/sequential_lora_seed0")).Reload().Tags()["scalars"]
    assert "routing/accuracy" in tags
    assert {f"routing/{t}/accuracy" for t in TASKS} <= set(tags)


def test_routed_agent_acts_predicts_and_evaluates(routed_run):
    out, _ = routed_run
    routed = load_routed_agent(out, "lora", 0, RouterConfig(decide_after=2), device="cpu")
    agent = routed.agent
    assert routed.signatures.names == list(TASKS)
    obs = np.zeros(agent.config.state_dim, dtype=np.float32)
    for _ in range(3):
        a = routed.act(obs)
        routed.observe(0.0)
        assert a.shape == (agent.config.act_dim,)
    ctx = routed._context
    assert len(ctx.decisions[0]) == 1  # decided once, on the 2nd observation
    actions, state = routed.predict(np.zeros((3, agent.config.state_dim)))
    assert actions.shape == (3, agent.config.act_dim)
    for router in ROUTERS:  # the oracle: the agent itself, told the tasks
        policy = agent if router == "oracle" else RoutedAgent(
            agent, dataclasses.replace(routed.router, router=router), routed.signatures)
        res = evaluate(policy, TASKS, n_episodes=2, seed=5, max_episode_steps=6,
                       progress=False)
        if router == "oracle":
            assert "routing" not in res[TASKS[0]]
            continue
        summary = routing_summary(res, agent.adapter_names)
        assert len(res[TASKS[0]]["routing"]["chosen"]) == 2
        assert sum(map(sum, summary["confusion"]["counts"])) == 4
        if router != "eva":
            assert summary["unknown_rate"] == 0.0  # centroid routers always choose


def test_router_refuses_missing_and_foreign_signatures(routed_run, tmp_path):
    out, _ = routed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    tdir = copy / f"runs/lora/seed_0/01_{TASKS[1]}"
    shutil.rmtree(tdir / "signature")
    with pytest.raises(SignatureError, match=rf"\['{TASKS[1]}'\] have an adapter but no "
                                             "signature") as info:
        load_routed_agent(copy, "lora", 0, device="cpu")
    command = f"python scripts/signatures.py --run {copy} --method lora --seed 0"
    assert command in str(info.value)  # names the command that writes them
    agent = load_finetuned_agent(copy, "lora", 0, device="cpu")  # told the tasks: no need
    pool = SignaturePool()
    pool.add(load_signature(out / f"runs/lora/seed_0/00_{TASKS[0]}", TASKS[0]))
    with pytest.raises(SignatureError, match=rf"\['{TASKS[1]}'\] have an adapter but no "
                                             "signature"):
        RoutedAgent(agent, RouterConfig(), pool).make_router()
    sig = load_signature(out / f"runs/lora/seed_0/00_{TASKS[0]}", TASKS[0])
    sig.fingerprint = "0" * 64
    with pytest.raises(SignatureError, match=f"task {TASKS[0]}: .*fingerprint mismatch"):
        RoutedAgent(agent).add_signature(sig)
    foreign = SignaturePool()
    foreign.add(sig)
    with pytest.raises(SignatureError, match=f"task {TASKS[0]}: .*fingerprint mismatch"):
        RoutedAgent(agent, signatures=foreign)
    sig.task = TASKS[1]
    sig.save(tdir / "signature")  # another base's signature in the task's directory
    with pytest.raises(SignatureError, match=f"task {TASKS[1]}: .*another base model"):
        load_routed_agent(copy, "lora", 0, device="cpu")
    with pytest.raises(ValueError, match=re.escape("agent.set_task(name)")):
        RoutedAgent(agent, RouterConfig(router="oracle"))


def test_evaluate_script_routes_a_finetune_run(routed_run, setup, tmp_path):
    out, _ = routed_run
    r = tmp_path / "r.json"
    proc = run_script("evaluate", ["--run", str(out), "--method", "lora", "--seed", "0",
                                   "--routing", "eva", "--routing-after", "2", "--episodes", "2",
                                   "--max-steps", "6", "--device", "cpu", "--out", str(r)])
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(r.read_text())
    assert payload["routing"] == "eva" and 0 <= payload["routing_accuracy"] <= 1
    assert set(payload["routing_per_task"]) == set(TASKS)
    assert payload["confusion"]["rows"] == list(TASKS)
    # zero-shot: a task the pretrained run has no target return for
    _, _, pre = setup
    proc = run_script("evaluate", ["--run", str(pre), "--tasks", "hammer", "--episodes", "1",
                                   "--max-steps", "3", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "assumed for hammer-v3" in proc.stdout


def test_episodes_that_never_decided_are_undecided_not_wrong(routed_run, tmp_path):
    out, _ = routed_run
    routed = load_routed_agent(out, "lora", 0, RouterConfig(decide_after=10), device="cpu")
    res = evaluate(routed, TASKS, n_episodes=2, seed=5, max_episode_steps=6,
                   progress=False)  # episodes end before deciding
    for task in TASKS:
        assert res[task]["routing"]["decided"] == [False, False]
        assert res[task]["routing"]["correct"] == [None, None]
    summary = routing_summary(res, routed.adapter_names)
    assert summary["accuracy"] is None and summary["per_task"] == dict.fromkeys(TASKS)
    assert summary["undecided_rate"] == 1.0 and summary["unknown_rate"] == 0.0
    # some decided: the accuracy of those, the others counted as undecided
    mixed = {TASKS[0]: {"routing": {"chosen": [TASKS[1], TASKS[0], None],
                                    "decided": [True, True, False],
                                    "correct": [0.0, 1.0, None]}}}
    summary = routing_summary(mixed, list(TASKS))
    assert summary["accuracy"] == 0.5 and summary["undecided_per_task"][TASKS[0]] == 1 / 3
    proc = run_script("evaluate", ["--run", str(out), "--method", "lora", "--seed", "0",
                                   "--routing", "eva", "--routing-after", "10", "--episodes",
                                   "1", "--max-steps", "6", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "accuracy undecided" in proc.stdout and "0.00 (of" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", ["episodes0", "corrupt_weights", "tampered_adapter",
                                  "no_method"])
def test_evaluate_script_bad_input_is_one_error_line(routed_run, setup, tmp_path, case):
    out, _ = routed_run
    _, _, pre = setup
    args = ["--episodes", "1", "--max-steps", "3", "--device", "cpu"]
    if case == "episodes0":
        argv, expect = ["--run", str(pre), "--tasks", TASKS[0], "--episodes", "0"], "--episodes"
        args = []
    elif case == "corrupt_weights":
        bad = tmp_path / "pre"
        shutil.copytree(pre, bad)
        (bad / "model.safetensors").write_bytes(b"garbage")
        argv, expect = ["--run", str(bad), "--tasks", TASKS[0]], "model.safetensors"
    elif case == "tampered_adapter":
        copy = tmp_path / "run"
        shutil.copytree(out, copy)
        f = copy / f"runs/lora/seed_0/00_{TASKS[0]}/adapter/adapter.safetensors"
        blob = bytearray(f.read_bytes())
        blob[-2] ^= 0xFF
        f.write_bytes(bytes(blob))
        argv, expect = ["--run", str(copy), "--method", "lora"], "checksum"
    else:
        argv, expect = ["--run", str(out)], "--method"
    proc = run_script("evaluate", argv + args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expect in lines[-1]
    assert "Traceback" not in proc.stderr


def test_thresholds_admit_the_episode_starts_a_router_decides_on(routed_run, setup):
    """Calibrated on full windows alone, a one-step episode start looked unknown to its own
    task (half the bench tier's episodes at k=1); the starts are now calibrated on too."""
    from agents.routing import _episode_start_batches, base_features
    from eva_rl.data import open_datasets

    out, _ = routed_run
    _, data, _ = setup
    routed = load_routed_agent(out, "lora", 0, device="cpu")
    agent = routed.agent
    datasets = open_datasets(data, TASKS)
    for task in TASKS:
        sig = routed.signatures.signatures[task]
        for batch in _episode_start_batches(agent, datasets[task], 16, seed=123):
            rows, window, _ = base_features(agent.model, list(sig.layers), batch)
            scores = sig.window_scores(rows, window, 16, "residual")
            assert float((scores > sig.thresholds["residual"]).float().mean()) <= 0.1, \
                (task, batch["mask"].shape[1])


def test_signatures_script_keeps_or_rewrites_a_runs_signatures(routed_run, tmp_path):
    out, _ = routed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    files = [copy / f"runs/lora/seed_0/{i:02d}_{t}/signature/signature.safetensors"
             for i, t in enumerate(TASKS)]
    before = [f.read_bytes() for f in files]
    args = ["--run", str(copy), "--method", "lora", "--seed", "0"]
    proc = run_script("signatures", args)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 0 signatures" in proc.stdout  # kept without --overwrite
    assert [f.read_bytes() for f in files] == before
    proc = run_script("signatures", [*args, "--rank", "2", "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 signatures" in proc.stdout
    routed = load_routed_agent(copy, "lora", 0, device="cpu")  # loads: checksums, base
    for task in TASKS:
        sig = routed.signatures.signatures[task]
        assert {s.components.shape[0] for s in sig.layers.values()} == {2}
    for bad, expect in ((["--rank", "0"], "--rank"), (["--method", "eva"], "methods"),
                        (["--seed", "3"], "seeds")):
        argv = [*args, *bad]
        proc = run_script("signatures", argv)
        assert proc.returncode == 2 and expect in proc.stderr.strip().splitlines()[-1], bad


@pytest.mark.parametrize("before", ["guess", "base"])
def test_before_the_decision_the_guess_or_the_base_acts(routed_run, before):
    out, _ = routed_run
    routed = load_routed_agent(out, "lora", 0, device="cpu",
                               router=RouterConfig(decide_after=3, before=before, unknown=False))
    obs = np.zeros(routed.agent.config.state_dim, dtype=np.float32)
    routed.act(obs)
    routed.observe(0.0)
    ctx = routed._context
    assert ctx.decisions[0] == []  # a guess is not a decision
    assert (ctx.choice[0] in TASKS) if before == "guess" else ctx.choice[0] is None
    for _ in range(2):
        routed.act(obs)
        routed.observe(0.0)
    assert len(ctx.decisions[0]) == 1 and ctx.choice[0] in TASKS


def test_router_config_names_the_valid_choices():
    with pytest.raises(ValueError, match="before='later'; valid: guess, base"):
        RouterConfig(before="later")


def test_arrow_routes_a_run_without_signatures(routed_run, tmp_path, monkeypatch):
    out, _ = routed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    removed = list(copy.glob("runs/lora/seed_0/*/signature"))
    assert len(removed) == len(TASKS)
    for sig in removed:
        shutil.rmtree(sig)
    routed = load_routed_agent(copy, "lora", 0, RouterConfig(router="arrow", decide_after=2),
                               device="cpu")  # reads no signature
    agent = routed.agent
    assert routed.signatures.names == [] and agent.adapter_names == list(TASKS)
    with pytest.raises(SignatureError, match="no task signatures"):
        RoutedAgent(agent, RouterConfig(router="eva")).make_router()

    def read_signature(*args, **kwargs):
        raise AssertionError("the arrow router read a signature")

    monkeypatch.setattr(TaskSignature, "load", classmethod(read_signature))
    monkeypatch.setattr(TaskSignature, "window_scores", read_signature)
    res = evaluate(routed, TASKS, n_episodes=2, seed=5, max_episode_steps=6, progress=False)
    for task in TASKS:
        assert res[task]["routing"]["decided"] == [True, True]
        assert set(res[task]["routing"]["chosen"]) <= set(TASKS)  # never "unknown"
    summary = routing_summary(res, agent.adapter_names)
    assert isinstance(summary["accuracy"], float) and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["unknown_rate"] == 0.0
    assert sum(map(sum, summary["confusion"]["counts"])) == 4
    with pytest.raises(ValueError, match="arrow_top_k must be >= 1"):
        RouterConfig(router="arrow", arrow_top_k=0)
    r = tmp_path / "arrow.json"
    proc = run_script("evaluate", ["--run", str(copy), "--method", "lora", "--seed", "0",
                                   "--routing", "arrow", "--routing-after", "2",
                                   "--arrow-top-k", "1", "--episodes", "1", "--max-steps", "4",
                                   "--device", "cpu", "--out", str(r)])
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(r.read_text())
    assert payload["routing"] == "arrow" and payload["arrow_top_k"] == 1
    assert 0.0 <= payload["routing_accuracy"] <= 1.0
