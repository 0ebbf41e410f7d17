"""`scripts/tier.py` refuses bad input before it writes anything: a bad tier file, bad
flags, a `--restore-from` publication whose records are not what the cells wrote, a
`--publish` target that is not this tier's, a second driver on `--out`. Each refusal is
one `error:` line (exit 2) and leaves every file byte-identical; none of these runs
collects or pretrains anything. Publishing adds each record's digest, which restoring
checks."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import tier as tier_script  # scripts/tier.py (tests/conftest.py puts scripts/ on the path)
from helpers import ROOT
from test_reliability import assert_one_error_line, run_env, write_lock
from test_tiers import tiny_tier

from agents.protocols import collect_results, run_dir_of, task_dir_of
from agents.reports.results import write_json
from agents.tier_records import DIGESTS_KEY, record_key
from agents.tiers import (
    TIER_FILE,
    get_tier,
    prepare_tier_dir,
    read_tier_file,
    restore_cells,
    stage_experiment,
    write_tier_file,
)
from eva_rl.io import CHECKSUM_KEY, content_sha256

BENCH = ROOT / "docs" / "results" / "bench"


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run `scripts/tier.py`'s main in this process; assert exit 2 and one `error:` line
    holding ``needles``; returns that line."""
    capsys.readouterr()
    rc = tier_script.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """A tiny tier's file and an earlier run of it (``tier.json`` and ``costs.json``)."""
    spec = write_tier_file(tiny_tier(), tmp_path / "tiny.json")
    out = tmp_path / "run"
    prepare_tier_dir(tiny_tier(), out)
    (out / "costs.json").write_text(json.dumps({
        "format": "eva-rl-tier-costs", "version": 1, "seconds": {"collect": 1.5},
        "peak_rss_mib": {"collect": 100.0}}))
    return tmp_path, spec, out


def tier_file(path: Path, **changes) -> Path:
    """The tiny tier's file with ``changes`` made to its JSON (bypassing `Tier`'s checks)."""
    d = tiny_tier().to_dict()
    d.update(changes)
    path.write_text(json.dumps({"format": "eva-rl-tier", "version": 1, "tier": d}))
    return path


BAD_FIELDS = [
    ({"methods": ["lora", "nope"]}, "unknown methods 'nope'"),
    ({"sequential_methods": ["lora", "Eva"]}, "unknown sequential_methods 'Eva'"),
    ({"tasks": ["window-close-v3", "no-such-task"]}, "unknown Meta-World task 'no-such-task'"),
    ({"pretrain_tasks": ["reach-v3", 7]}, "pretrain_tasks must be a list of task names"),
    ({"episodes": -1}, "episodes must be an integer >= 1, got -1"),
    ({"episodes": 2.5}, "episodes must be an integer >= 1, got 2.5"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"sequential_final_episodes": 0}, "sequential_final_episodes must be an integer >= 1"),
    ({"data_seed": "0"}, "data_seed must be an integer >= 0"),
    ({"seeds": [0, -1]}, "seeds must be a list of integers >= 0"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [0, 0]}, "seeds lists 0 more than once"),
    ({"tasks": []}, "tasks must be a non-empty list"),
    ({"tasks": ["window-close-v3", "window-close"]}, "tasks lists 'window-close-v3' more than"),
    ({"methods": ["lora", "lora"]}, "methods lists 'lora' more than once"),
    ({"noise": [0.0, "a"]}, "noise must be a list of finite numbers >= 0"),
    ({"noise": [0.1, -0.2]}, "noise must be a list of finite numbers >= 0"),
    ({"noise": "0.1"}, "noise must be a list, got '0.1'"),
    ({"name": "../evil"}, "tier name '../evil' must be 1-64 letters"),
    ({"name": "a/b"}, "tier name 'a/b' must be"),
    ({"name": ""}, "tier name '' must be"),
]


@pytest.mark.parametrize(("changes", "needle"), BAD_FIELDS,
                         ids=[next(iter(c)) + "-" + str(i) for i, (c, _) in
                              enumerate(BAD_FIELDS)])
def test_a_bad_tier_file_is_refused_before_anything_is_written(work, capsys, changes, needle):
    tmp, _, out = work
    bad = tier_file(tmp / "bad.json", **changes)
    before = tree(tmp)
    refused(capsys, ["--tier", str(bad), "--out", str(out), "--workers", "1",
                     "--no-progress"], "bad.json", needle)
    assert tree(tmp) == before


def test_a_tier_checks_its_fields_when_made_in_code():
    with pytest.raises(ValueError, match="unknown methods 'nope'"):
        tiny_tier(methods=("lora", "nope"))
    with pytest.raises(ValueError, match="tier name '../x' must be"):
        tiny_tier(name="../x")
    assert tiny_tier(tasks=("window-close", "faucet-close-v2")).tasks == \
        ("window-close-v3", "faucet-close-v3")  # names resolved, as everywhere


def test_bad_flags_and_stage_inputs_are_refused_before_anything_is_written(work, capsys):
    tmp, spec, out = work
    base = ["--tier", str(spec), "--out", str(out), "--no-progress"]
    before = tree(tmp)
    refused(capsys, [*base, "--workers", "-3"], "--workers must be >= 1, got -3")
    refused(capsys, [*base, "--overwrite"], "--overwrite applies to --publish only")
    refused(capsys, [*base, "--stages", "collect,pretrain", "--restore-from", str(tmp)],
            "--restore-from is read by the tune, single and sequential stages")
    refused(capsys, [*base, "--stages", "report"], "no results to report yet")
    refused(capsys, [*base, "--stages", "single"], "no pretrained model yet")
    refused(capsys, [*base, "--stages", "pretrain"], "dataset for task 'reach-v3' is missing")
    refused(capsys, [*base, "--stages", "collect", "--publish", str(tmp / "pub")],
            "no results to publish yet")
    refused(capsys, ["--tier", str(spec), "--out", str(tmp / "new"), "--stages", "report"],
            "no results to report yet")
    assert tree(tmp) == before  # the new --out was not left behind either
    other = tier_file(tmp / "other.json", episodes=3)
    refused(capsys, ["--tier", str(other), "--out", str(out)],
            "holds another tier's settings (differs in: episodes)")
    assert tree(tmp) == {**before, "other.json": (tmp / "other.json").read_bytes()}


def test_a_copied_tier_run_is_told_how_to_go_on(work, capsys):
    tmp, spec, out = work
    exp, _ = stage_experiment(tiny_tier(), tmp / "original", "single")  # made there
    run_dir = out / "single"
    run_dir.mkdir()
    write_json(run_dir / "config.json", {"format": "eva-rl-finetune", "version": 2,
                                         "experiment": exp.to_dict()})
    before = tree(tmp)
    line = refused(capsys, ["--tier", str(spec), "--out", str(out), "--stages", "single"],
                   "was made by a tier run in another directory", "copied or moved",
                   f"--restore-from {out}")
    assert "--overwrite" not in line  # tier.py has none for its --out
    assert tree(tmp) == before


# ------------------------------------------------------------------ --restore-from


def publication(root: Path, tier_json: Path = BENCH / TIER_FILE) -> Path:
    """A copy of the published bench tier's small files (its results as published)."""
    root.mkdir(parents=True)
    for name in (TIER_FILE, "costs.json", "fingerprints.json"):
        shutil.copy2(BENCH / name if name != TIER_FILE else tier_json, root / name)
    for sub in ("single", "sequential"):
        (root / sub).mkdir()
        shutil.copy2(BENCH / sub / "results.json", root / sub / "results.json")
    return root


def edit_results(pub: Path, edit, protocol: str = "single") -> None:
    path = pub / protocol / "results.json"
    results = json.loads(path.read_text())
    edit(results)
    path.write_text(json.dumps(results))


def with_digests(results: dict) -> None:
    """Digests as `--publish` adds them (here from the published records themselves)."""
    results[DIGESTS_KEY] = {record_key(run["method"], run["seed"], rec["index"]):
                            content_sha256(rec) for run in results["runs"]
                            for rec in run["per_task"]}


def set_success(results: dict, value: float, curve_too: bool = False) -> None:
    rec = results["runs"][0]["per_task"][3]
    rec["success"] = value
    if curve_too:
        rec["success_curve"]["success"][-1] = value


def set_index(results: dict, index: int) -> None:
    results["runs"][1]["per_task"][-1]["index"] = index


def method_outside(results: dict) -> None:
    results["runs"][0]["method"] = "dora"
    results["runs"][0]["config"] = results["runs"][1]["config"]


BAD_PUBLICATIONS = {
    "edited success": (lambda r: set_success(r, 0.99),
                       "success 0.99 / mean_return", "not the last point of its success curve"),
    "edited success, digests": (lambda r: (with_digests(r), set_success(r, 0.99, True)),
                                "fft seed 0 push-back-v3: the record differs from its digest"),
    "NaN success": (lambda r: set_success(r, math.nan),
                    "success must be a finite number in [0.0, 1.0], got nan"),
    "success above 1": (lambda r: set_success(r, 1.5, True), "got 1.5"),
    "index out of range": (lambda r: set_index(r, 10),
                           "fft seed 1: record index 10 is not a task index (0..9)"),
    "negative index": (lambda r: set_index(r, -1), "record index -1 is not a task index"),
    "index of another task": (lambda r: set_index(r, 8), "record 8 is of task "
                              "'peg-unplug-side-v3', but task 8 is window-close-v3"),
    "run twice": (lambda r: r["runs"].append(r["runs"][0]), "fft seed 0 appears twice"),
    "seed outside the tier": (lambda r: r["runs"][0].update(seed=7),
                              "run 0: seed 7 is not one of the tier's seeds (0, 1, 2)"),
    "record of another run": (lambda r: r["runs"][0]["per_task"][0].update(seed=1),
                              "names 'fft' seed 1, not its run's"),
    "unknown key": (lambda r: r["runs"][0]["per_task"][0].update(bonus=1),
                    "unknown: bonus"),
    "another fine-tuning setting": (lambda r: r["runs"][2]["config"].update(rank=64),
                                    "fine-tuned with other settings than the tier's (rank"),
    "digest missing": (lambda r: (with_digests(r), r[DIGESTS_KEY].pop("lora/seed_2/09")),
                       "no digest 'lora/seed_2/09'"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLICATIONS))
def test_restore_refuses_a_publication_not_made_by_the_cells(tmp_path, capsys, case):
    edit, *needles = BAD_PUBLICATIONS[case]
    pub = publication(tmp_path / "pub")
    edit_results(pub, edit)
    before = tree(tmp_path)
    refused(capsys, ["--tier", "bench", "--out", str(tmp_path / "run"), "--stages", "single",
                     "--restore-from", str(pub)], "pub/single/results.json", *needles)
    assert tree(tmp_path) == before


def test_restore_refuses_a_missing_or_another_tiers_publication(tmp_path, capsys):
    pub = publication(tmp_path / "pub")
    edit_results(pub, lambda r: r["runs"][0].update(method="dora"), "sequential")
    tiny = publication(tmp_path / "tiny", tier_json=write_tier_file(tiny_tier(),
                                                                    tmp_path / "tiny.json"))
    before = tree(tmp_path)
    args = ["--tier", "bench", "--out", str(tmp_path / "run")]
    refused(capsys, [*args, "--restore-from", str(tmp_path / "nope")],
            "nope: no such directory")
    refused(capsys, [*args, "--restore-from", str(tiny)],
            "tiny/tier.json is another tier's (differs in:", "cannot be reused for bench")
    refused(capsys, [*args, "--restore-from", str(pub)],  # default stages: nothing ran
            "sequential/results.json: run 0: method 'dora' is not one of the tier's "
            "sequential methods (lora, eva, eva_dora, fft)")
    assert tree(tmp_path) == before


def test_the_published_bench_tier_passes_the_restore_checks(tmp_path, capsys):
    """docs/results/bench, published before digests, is still restorable: its records
    pass (the next check, the missing base model, is what stops this run)."""
    before = tree(tmp_path)
    refused(capsys, ["--tier", "bench", "--out", str(tmp_path / "run"), "--stages",
                     "single,sequential", "--restore-from", str(BENCH)],
            "no pretrained model yet")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ --publish and the lock


def test_publish_refuses_another_tiers_publication_and_the_run_itself(work, capsys):
    tmp, spec, out = work
    other = publication(tmp / "bench-pub")
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    base = ["--tier", str(spec), "--out", str(out), "--no-progress"]
    before = tree(tmp)
    refused(capsys, [*base, "--publish", str(other)],
            "holds the publication of another tier (bench; differs in:", "--overwrite")
    refused(capsys, [*base, "--publish", str(junk)], "not a publication of a tier")
    refused(capsys, [*base, "--publish", str(out)], "is --out or inside it")
    refused(capsys, [*base, "--publish", str(out / "pub")], "is --out or inside it")
    refused(capsys, ["--tier", str(spec), "--out", str(other / "run"), "--publish",
                     str(other)], "is inside --publish")
    assert tree(tmp) == before


def test_a_second_driver_is_refused_naming_the_holder(work):
    tmp, spec, out = work
    write_lock(out, os.getpid())  # this (live) process holds --out
    before = tree(tmp)
    done = run_env("tier", ["--tier", str(spec), "--out", str(out), "--workers", "1",
                            "--no-progress"], timeout=120)
    assert_one_error_line(done, f"{out} is in use by pid {os.getpid()}")
    assert tree(tmp) == before


def test_the_cli_refuses_bad_input_in_one_line(work):
    """As a user runs it (a fresh interpreter): a bad tier file and a NaN in a
    publication; nothing written."""
    tmp, _, out = work
    pub = publication(tmp / "pub")
    edit_results(pub, lambda r: set_success(r, math.nan))
    bad = tier_file(tmp / "bad.json", name="../x")
    before = tree(tmp)
    done = run_env("tier", ["--tier", str(bad), "--out", str(out)], timeout=120)
    assert_one_error_line(done, "tier name '../x' must be")
    done = run_env("tier", ["--tier", "bench", "--out", str(tmp / "b"), "--restore-from",
                            str(pub)], timeout=120)
    assert_one_error_line(done, "success must be a finite number")
    assert tree(tmp) == before


def test_publish_adds_digests_that_restore_checks(tmp_path):
    """A run made of restored bench records is published: each record's digest is its
    record.json checksum; a later restore checks it; a publication edited after, an OUT
    whose results.json is not its records, another tier's target are refused."""
    bench = get_tier("bench")
    source = publication(tmp_path / "source")
    edit_results(source, lambda r: r.update(runs=r["runs"][:2]))  # two cells: fast
    run = tmp_path / "run"
    prepare_tier_dir(bench, run)
    assert restore_cells(bench, run, source, "single") == 20
    exp, run_dir = stage_experiment(bench, run, "single")
    write_json(run_dir / "results.json", collect_results(run_dir, exp))

    dest = tmp_path / "dest"
    tier_script.publish(bench, run, dest)
    published = json.loads((dest / "single" / "results.json").read_text())
    digests = published[DIGESTS_KEY]
    assert len(digests) == 20
    rec = published["runs"][1]["per_task"][4]
    saved = json.loads((task_dir_of(run_dir_of(run_dir, "fft", 1), 4, rec["task"])
                        / "record.json").read_text())
    assert digests["fft/seed_1/04"] == saved[CHECKSUM_KEY] == content_sha256(rec)
    assert read_tier_file(dest / TIER_FILE) == bench
    assert restore_cells(bench, tmp_path / "again", dest, "single") == 20
    tier_script.publish(bench, run, dest)  # the same tier's publication: replaced

    edit_results(dest, lambda r: set_success(r, 0.99, curve_too=True))
    with pytest.raises(ValueError, match="differs from its digest"):
        restore_cells(bench, tmp_path / "third", dest, "single")
    assert not (tmp_path / "third").exists()

    edit_results(run, lambda r: set_success(r, 0.99, curve_too=True))
    with pytest.raises(ValueError, match="rerun the stage"):
        tier_script.publish(bench, run, tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()
    write_json(run_dir / "results.json", collect_results(run_dir, exp))

    other = publication(tmp_path / "other", tier_json=write_tier_file(
        tiny_tier(), tmp_path / "tiny.json"))
    with pytest.raises(FileExistsError, match="another tier"):
        tier_script.publish(bench, run, other)
    old = tree(other)
    tier_script.publish(bench, run, other, overwrite=True)
    assert read_tier_file(other / TIER_FILE) == bench
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("other.old-")]
    assert len(moved) == 1 and tree(moved[0]) == old  # moved aside, nothing deleted
