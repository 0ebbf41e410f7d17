"""`scripts/reproduce.py` as an attacker of a published result would try it: a work
directory made for another tier, malformed published files, and the graded verdict (a pure
function of two task records, `agents.reproduction_verdict`); and the base-model messages
of `agents.tiers`."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import reproduce
import torch
from test_tiers import tiny_tier

from agents.protocols import run_experiment
from agents.reproduction import fingerprint_notes
from agents.reproduction_verdict import fisher_exact, grade
from agents.runs import RECORD_FILE, read_record
from agents.tiers import (
    check_same_base,
    collect_tier_data,
    explain_base_difference,
    fingerprints,
    pretrain_tier,
    read_fingerprints,
    single_experiment,
    write_tier_file,
)
from eva_rl.io import write_checked_json, write_json_atomic

TASK = "faucet-close-v3"
CELL = ["--method", "lora", "--task", "faucet-close", "--seed", "0", "--no-progress",
        "--workers", "1"]
BENCH = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench"


def one_tier():
    """The tiny tier with one method, one task and one seed: one cell of seconds."""
    return tiny_tier(methods=("lora",), tasks=(TASK,), sequential_methods=("lora",))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An honest publication of `one_tier` made on this machine (tier.json, the `single`
    results, fingerprints.json) and a work directory that reproduced its cell once:
    ``(pub, work, first_output)``."""
    threads = torch.get_num_threads()
    tier = one_tier()
    base = tmp_path_factory.mktemp("reproduce")
    root, pub, work = base / "run", base / "pub", base / "work"
    collect_tier_data(tier, root, workers=1, progress=False)
    pretrain_tier(tier, root, progress=False)
    run_experiment(single_experiment(tier, root), root / "single", report=False)
    write_tier_file(tier, pub / "tier.json")
    (pub / "single").mkdir()
    shutil.copy(root / "single" / "results.json", pub / "single" / "results.json")
    write_json_atomic(pub / "fingerprints.json", fingerprints(root, tier.data_tasks))
    first = _main(["--results", str(pub), "--work", str(work), *CELL])
    torch.set_num_threads(threads)
    return pub, work, first, root


def _main(argv):
    """``reproduce.main(argv)``: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = reproduce.main(argv)
    torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def _one_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- the work directory


def test_an_honest_publication_reproduces_identically_then_resumes(published):
    pub, work, (code, out, err), _ = published
    assert code == 0, out + err
    assert "identical (" in out and "note:" not in out and "reused" not in out
    saved = json.loads((work / "reproduce.json").read_text())
    assert saved["tier"] == one_tier().to_dict()
    assert [c["finished"] is not None for c in saved["cells"].values()] == [True]
    code, out, err = _main(["--results", str(pub), "--work", str(work), *CELL])
    assert code == 0, out + err
    assert "reused the cell finished at " in out and "identical (" in out


def test_a_work_directory_made_for_another_tier_is_refused_untouched(published, tmp_path):
    pub, work, _, _ = published
    other = tmp_path / "pub"
    shutil.copytree(pub, other)
    tier = json.loads((other / "tier.json").read_text())
    tier["tier"]["pretrain"]["train"]["steps"] = 8  # 6 -> 8: another base model
    (other / "tier.json").write_text(json.dumps(tier))
    before = _snapshot(work)
    code, out, err = _main(["--results", str(other), "--work", str(work), *CELL])
    assert code == 2 and "identical" not in out
    _one_error(err, str(work / "reproduce.json"), "pretrain.train.steps 6 -> 8",
               "fresh --work")
    assert _snapshot(work) == before


def test_a_work_directory_without_its_record_is_refused(published, tmp_path):
    pub, _, _, root = published  # the tier's own run: data and model, but not remade here
    before = _snapshot(root)
    code, _, err = _main(["--results", str(pub), "--work", str(root), *CELL])
    assert code == 2
    _one_error(err, f"{root} holds ", "no reproduce.json", "fresh --work")
    assert _snapshot(root) == before
    corrupt = tmp_path / "work"
    shutil.copytree(published[1], corrupt)
    (corrupt / "reproduce.json").write_text("{")
    code, _, err = _main(["--results", str(pub), "--work", str(corrupt), *CELL])
    assert code == 2
    _one_error(err, str(corrupt / "reproduce.json"), "not valid JSON", "fresh --work")


def test_a_finished_cell_edited_with_a_matching_checksum_is_not_compared(published, tmp_path):
    pub, work, _, _ = published
    copy_ = tmp_path / "work"
    shutil.copytree(work, copy_)
    record_dir = next(copy_.glob("cell-*/runs/lora/seed_0/00_faucet-close-v3"))
    record = read_record(record_dir).to_dict()
    record["mean_return"] += 1.0
    write_checked_json(record_dir / RECORD_FILE, record)  # its checksum is right again
    code, out, err = _main(["--results", str(pub), "--work", str(copy_), *CELL])
    assert code == 2 and "identical" not in out
    _one_error(err, str(record_dir / RECORD_FILE), "changed or removed since")
    shutil.rmtree(next(copy_.glob("cell-*")))  # what the refusal says: run it again
    code, out, err = _main(["--results", str(pub), "--work", str(copy_), *CELL])
    assert code == 0 and "identical (" in out and "reused" not in out, out + err
    shutil.rmtree(next(copy_.glob("cell-*")))
    saved = json.loads((copy_ / "reproduce.json").read_text())
    saved["cells"] = {}  # a cell directory this record never started
    (copy_ / "reproduce.json").write_text(json.dumps(saved))
    shutil.copytree(next(work.glob("cell-*")), copy_ / next(work.glob("cell-*")).name)
    code, _, err = _main(["--results", str(pub), "--work", str(copy_), *CELL])
    assert code == 2
    _one_error(err, "never started it")


@pytest.mark.parametrize("where", ["inside", "holds", "symlink"])
def test_work_must_lie_apart_from_the_publication(published, tmp_path, where):
    pub = tmp_path / "pub"
    shutil.copytree(published[0], pub)
    work = {"inside": pub / "work", "holds": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        work.symlink_to(pub / "single")
    before = _snapshot(tmp_path)
    code, _, err = _main(["--results", str(pub), "--work", str(work), *CELL])
    assert code == 2
    _one_error(err, "overlaps the publication")
    assert _snapshot(tmp_path) == before and not (pub / "work").exists()


# ----------------------------------------------------------------- malformed publications


def _cell(results: dict) -> dict:
    return results["runs"][0]["per_task"][0]


def _set(key, value):
    def change(results):
        _cell(results)[key] = value
    return change


def _drop(key):
    def change(results):
        del _cell(results)[key]
    return change


def _curve(name, key, value):
    def change(results):
        _cell(results)[name][key][-1] = value
    return change


def _duplicate(results):
    results["runs"].append(copy.deepcopy(results["runs"][0]))


def _prints(change):
    def edit(prints):
        change(prints)
        return prints
    return edit


RESULTS_CASES = {
    "success is a string": (_set("success", "1.0"), "success '1.0' is not a finite number"),
    "success is null": (_set("success", None), "success None is not a finite number"),
    "success is NaN": (_set("success", math.nan), "success nan"),
    "success above 1": (_set("success", 1.5), "in [0, 1]"),
    "success is no count": (_set("success", 0.25), "not a count of 2 episodes"),
    "auc below 0": (_set("auc", -0.1), "auc -0.1"),
    "mean_return infinite": (_set("mean_return", math.inf), "mean_return inf"),
    "mean_return negative": (_set("mean_return", -5.0), "mean_return -5.0"),
    "auc missing": (_drop("auc"), "missing keys: auc"),
    "trainable_params a bool": (_set("trainable_params", True), "trainable_params True"),
    "curve holds null": (_curve("success_curve", "return", None), "success_curve: return"),
    "loss curve a string": (_set("loss_curve", "low"), "loss_curve: expected an object"),
    "other final episodes": (_set("final_episodes", 50), "final_episodes 50"),
    "another index": (_set("index", 3), "index 3"),
    "the cell twice": (_duplicate, "2 records of lora x faucet-close-v3 x seed 0"),
    "runs not a list": (lambda r: r.update(runs={}), "no 'runs' list"),
    "other settings": (lambda r: r["runs"][0]["config"].update(rank=8),
                       "not made with the tier's fine-tuning settings (rank: 8 -> 4)"),
}
FINGERPRINT_CASES = {
    "not JSON": ("{not json", "corrupt fingerprints file"),
    "empty": ("", "corrupt fingerprints file"),
    "a list": ("[]", "expected a JSON object, got list"),
    "no data": (_prints(lambda f: f.pop("data")), "'data' must be an object"),
    "short digest": (_prints(lambda f: f.update(pretrained="abc")),
                     "'pretrained' is not a SHA-256"),
    "number digest": (_prints(lambda f: f["data"].update({TASK: 5})), "data['faucet-close-v3']"),
    "machine a string": (_prints(lambda f: f.update(machine="x")), "corrupt machine record"),
    "a dataset missing": (_prints(lambda f: f["data"].pop(TASK)), "no dataset digest of"),
}


def _refused(pub: Path, tmp_path: Path, *needles: str) -> None:
    work = tmp_path / "work"
    code, out, err = _main(["--results", str(pub), "--work", str(work), *CELL])
    assert code == 2 and out == ""
    _one_error(err, *needles)
    assert not work.exists()  # refused before anything was made


@pytest.mark.parametrize("case", RESULTS_CASES)
def test_a_malformed_results_file_is_refused_before_any_work(published, tmp_path, case):
    pub = tmp_path / "pub"
    shutil.copytree(published[0], pub)
    path = pub / "single" / "results.json"
    results = json.loads(path.read_text())
    change, needle = RESULTS_CASES[case]
    change(results)
    path.write_text(json.dumps(results))  # NaN and inf as JSON's NaN / Infinity tokens
    _refused(pub, tmp_path, str(path), needle)


@pytest.mark.parametrize("case", FINGERPRINT_CASES)
def test_a_malformed_fingerprints_file_is_refused_before_any_work(published, tmp_path, case):
    pub = tmp_path / "pub"
    shutil.copytree(published[0], pub)
    path = pub / "fingerprints.json"
    edit, needle = FINGERPRINT_CASES[case]
    text = edit if isinstance(edit, str) else json.dumps(edit(json.loads(path.read_text())))
    path.write_text(text)
    _refused(pub, tmp_path, str(path), needle)


@pytest.mark.parametrize("text", ["{not json", "", json.dumps({"format": "eva-rl-tier"})])
def test_a_malformed_tier_file_is_refused_before_any_work(published, tmp_path, text):
    pub = tmp_path / "pub"
    shutil.copytree(published[0], pub)
    (pub / "tier.json").write_text(text)
    _refused(pub, tmp_path, str(pub / "tier.json"))


def test_a_seed_the_tier_does_not_have_is_refused(published, tmp_path):
    code, _, err = _main(["--results", str(published[0]), "--work", str(tmp_path / "w"),
                          "--method", "lora", "--task", "faucet-close", "--seed", "7"])
    assert code == 2
    _one_error(err, "7 is not a seed of tier tiny; its seeds: 0")


# ----------------------------------------------------------------- the graded verdict


@pytest.fixture(scope="module")
def record():
    """A published bench record: dora x push-wall x seed 0 (41 of 50 final episodes)."""
    results = json.loads((BENCH / "single" / "results.json").read_text())
    run = next(r for r in results["runs"] if r["method"] == "dora" and r["seed"] == 0)
    return next(r for r in run["per_task"] if r["task"] == "push-wall-v3")


def _rescaled(rec: dict, factor: float) -> dict:
    """``rec`` with every continuous value times ``factor`` (what rounding changes)."""
    out = copy.deepcopy(rec)
    out["mean_return"] *= factor
    out["success_curve"]["return"] = [v * factor for v in out["success_curve"]["return"]]
    out["loss_curve"]["loss"] = [v * factor for v in out["loss_curve"]["loss"]]
    out["first_grad_norm"] *= factor
    return out


def _final_success(rec: dict, success: float) -> dict:
    out = copy.deepcopy(rec)
    out["success"] = out["success_curve"]["success"][-1] = success
    curve = out["success_curve"]
    out["auc"] = sum(curve["success"][1:]) / (len(curve["success"]) - 1)  # step 0 left out
    return out


def test_fisher_exact_matches_known_p_values():
    # scipy.stats.fisher_exact([[k1, n - k1], [k2, n - k2]]).pvalue
    assert fisher_exact(41, 49, 50) == pytest.approx(0.01566048989604553, rel=1e-12)
    assert fisher_exact(30, 40, 50) == pytest.approx(0.04858163161294097, rel=1e-12)
    assert fisher_exact(0, 0, 50) == 1.0 and fisher_exact(1, 2, 2) == 1.0


def test_the_verdict_is_graded(record):
    assert record["success"] == 0.82 and record["final_episodes"] == 50
    same = grade(record, copy.deepcopy(record), 50)
    assert (same.grade, same.exit_code) == ("identical", 0)

    rounding = grade(record, _rescaled(record, 1 + 1e-4), 50)
    assert (rounding.grade, rounding.exit_code) == ("equal within float rounding", 3)
    assert rounding.deviations["success"] == (0.0, 0.0)
    assert rounding.deviations["mean_return"][1] == pytest.approx(1e-4, rel=1e-3)
    assert "mean_return abs " in rounding.deviation_line()

    returns = grade(record, _rescaled(record, 1.05), 50)  # counts equal, returns 5% off
    assert (returns.grade, returns.exit_code) == ("consistent", 4)
    assert "mean_return" in " ".join(returns.reasons) and "p = 1" in " ".join(returns.reasons)

    close = grade(record, _rescaled(_final_success(record, 0.86), 1.01), 50)  # 41 vs 43
    assert close.grade == "consistent" and "41/50 published vs 43/50" in " ".join(close.reasons)

    far = grade(record, _final_success(record, 0.98), 50)  # 41 vs 49: p = 0.016
    assert (far.grade, far.exit_code) == ("different", 1)
    assert "p = 0.0157 < 0.05" in " ".join(far.reasons)

    params = _rescaled(record, 1 + 1e-6)
    params["trainable_params"] += 1
    assert grade(record, params, 50).grade == "different"
    steps = copy.deepcopy(record)
    steps["success_curve"]["steps"][1] = 300
    assert grade(record, steps, 50).grade == "different"

    edited = copy.deepcopy(record)  # the AUC alone edited: no run writes that record
    edited["auc"] += 0.125
    verdict = grade(edited, record, 50)
    assert verdict.grade == "different"
    assert "published auc 0.98" in " ".join(verdict.reasons)
    assert "is not its success curve's (0.86)" in " ".join(verdict.reasons)


# ----------------------------------------------------------------- base-model messages


def _fake_run(root: Path, machine: dict) -> None:
    (root / "data" / TASK).mkdir(parents=True)
    (root / "data" / TASK / "actions.npy").write_bytes(b"arrays")
    (root / "pretrained").mkdir()
    (root / "pretrained" / "model.safetensors").write_bytes(b"weights made here")
    (root / "machine.json").write_text(json.dumps(machine))


MACHINE = {"cpu": "CPU A", "cpu_capability": "AVX2", "python": "3.11.7", "torch": "2.13.0",
           "numpy": "2.4.6"}


@pytest.mark.parametrize("published_on, says, not_says", [
    (MACHINE, "differ on the same recorded machine", "between CPU kinds"),
    ({**MACHINE, "cpu": "CPU B", "cpu_capability": "AVX512"}, "differs between CPU kinds",
     "same recorded machine"),
    ({**MACHINE, "torch": "2.12.0"}, "library versions differ (torch 2.12.0 vs 2.13.0)",
     "between CPU kinds"),
    (None, "whether the CPU kinds differ is unknown", "same recorded machine"),
])
def test_a_base_model_difference_names_its_likely_cause(tmp_path, published_on, says,
                                                        not_says):
    root, pub = tmp_path / "run", tmp_path / "pub"
    _fake_run(root, MACHINE)
    pub.mkdir()
    saved = {"data": {TASK: "0" * 64}, "pretrained": "0" * 64, "machine": published_on}
    (pub / "fingerprints.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="is not the base model") as err:
        check_same_base(root, pub)
    assert says in str(err.value) and not_says not in str(err.value)
    notes = fingerprint_notes(pub, read_fingerprints(pub), root, [TASK])
    assert notes[0] == f"dataset {TASK}: differs from the published one"
    assert says in notes[1] and not_says not in notes[1]
    assert explain_base_difference(published_on, MACHINE) in notes[1]


def test_a_malformed_fingerprints_file_stops_the_restore_guard(tmp_path):
    root, pub = tmp_path / "run", tmp_path / "pub"
    _fake_run(root, MACHINE)
    pub.mkdir()
    (pub / "fingerprints.json").write_text("")
    with pytest.raises(ValueError, match=r"fingerprints.json: corrupt fingerprints file"):
        check_same_base(root, pub)
    (root / "machine.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"machine.json: corrupt machine record"):
        fingerprints(root, [TASK])


def test_a_publication_without_fingerprints_is_compared_on_the_cell_alone(tmp_path):
    notes = fingerprint_notes(tmp_path, None, tmp_path / "work", [TASK])
    assert notes == [f"{tmp_path / 'fingerprints.json'} is missing: datasets and pretrained "
                     "model not compared (the verdict rests on the cell alone)"]
