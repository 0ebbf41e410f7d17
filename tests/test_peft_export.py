"""A tiny fine-tuning run's task adapters exported to PEFT (agents.peft_export and
scripts/export_peft.py), read back by PEFT itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import export_peft
import pytest
import torch
from helpers import TASKS, experiment

from agents.dt_agent import DTAgent
from agents.peft_export import export_run_adapters
from agents.protocols import run_experiment
from eva_rl.adapters import load_adapter

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finetuned(setup, tmp_path_factory):
    """A single-protocol run of eva_dora and pissa on the two tiny tasks."""
    out = tmp_path_factory.mktemp("peft-run") / "run"
    run_experiment(experiment(setup, protocol="single", methods=("eva_dora", "pissa")), out,
                   report=False)
    return out, setup[2]


def window(model, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    k = cfg.context_len
    return {"states": torch.randn(3, k, cfg.state_dim, generator=g),
            "actions": torch.rand(3, k, cfg.act_dim, generator=g) * 2 - 1,
            "rewards": torch.rand(3, k, 1, generator=g),
            "returns_to_go": torch.rand(3, k, 1, generator=g) * 5,
            "timesteps": torch.arange(k).repeat(3, 1)}


@pytest.mark.parametrize("method", ["eva_dora", "pissa"])
def test_run_adapters_load_in_peft_with_our_outputs(finetuned, method, tmp_path):
    run, pre = finetuned
    written = export_run_adapters(run, method, 0, tmp_path / "peft")
    assert list(written) == list(TASKS)
    base = DTAgent.load(pre, device="cpu").model
    for i, task in enumerate(TASKS):
        d = written[task]
        assert d == tmp_path / "peft" / method / "seed_0" / task
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(Path(pre).resolve())
        assert cfg["init_lora_weights"] == ("eva" if method == "eva_dora" else True)
        ours = copy.deepcopy(base)
        load_adapter(ours, run / "runs" / method / "seed_0" / f"{i:02d}_{task}" / "adapter")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        batch = window(base, seed=i)
        with torch.no_grad():
            y_ours, y_theirs, y_base = ours(**batch), theirs(**batch), base(**batch)
        assert float((y_ours - y_theirs).abs().max()) < 1e-6
        assert not torch.equal(y_ours, y_base)  # the trained adapter changes the output


def test_export_script_and_its_errors(finetuned, tmp_path, capsys):
    run, _ = finetuned
    main = export_peft.main
    out = tmp_path / "exports"
    base = ["--run", str(run), "--out", str(out)]

    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "valid methods" in error(base + ["--method", "lorra"])
    assert "has no method 'lora'; it ran eva_dora, pissa" in error(base + ["--method", "lora"])
    assert "no seed 3" in error(base + ["--method", "pissa", "--seed", "3"])
    assert "are not in" in error(base + ["--method", "pissa", "--tasks", "hammer"])
    assert "fine-tuning run config" in error(["--run", str(tmp_path / "nope"), "--out", str(out),
                                              "--method", "pissa"])
    assert not out.exists()
    assert main(base + ["--method", "pissa", "--tasks", TASKS[1]]) == 0
    assert f"{TASKS[1]}: " in capsys.readouterr().out
    assert sorted(p.name for p in (out / "pissa" / "seed_0").iterdir()) == [TASKS[1]]
    assert "not empty; pass --overwrite" in error(base + ["--method", "pissa"])
    assert main(base + ["--method", "pissa", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "pissa" / "seed_0").iterdir()) == sorted(TASKS)
    # an unfinished task (its record removed) is named
    unfinished = tmp_path / "unfinished"
    (unfinished / "runs").mkdir(parents=True)
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(ValueError, match="are not finished"):
        export_run_adapters(unfinished, "pissa", 0, tmp_path / "x")
