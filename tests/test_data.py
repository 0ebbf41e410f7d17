"""On-disk dataset format: round trip, validation errors, atomic writes, npz importer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from eva_rl.data import (
    FORMAT_VERSION,
    DatasetError,
    episode_offsets_from_dones,
    import_npz,
    importers,
    is_complete_dataset,
    open_dataset,
    open_datasets,
    remove_temp_dirs,
    temp_dirs,
    write_dataset,
)
from eva_rl.data import format as fmt


def make_arrays(seed=0, lengths=(7, 12, 5), obs_dim=6, act_dim=3):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.uniform(0, 10, size=n).astype(np.float32),
        "successes": rng.uniform(size=n) > 0.7,
        "episode_offsets": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
    }


@pytest.fixture
def ds_path(tmp_path):
    path = tmp_path / "hammer-v3"
    write_dataset(path, task="hammer-v3", metadata={"collector": "test"}, **make_arrays())
    return path


# ----------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    arrays = make_arrays()
    meta = {"collector": "scripted", "noise": np.float64(0.1), "seed": np.int64(3)}
    path = tmp_path / "push-v3"
    written = write_dataset(path, task="push-v3", metadata=meta, **arrays)
    ds = open_dataset(path)
    for name, arr in arrays.items():
        got = getattr(ds, name)
        assert isinstance(got, np.memmap), name
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    assert ds.task == written.task == "push-v3"
    assert (ds.n_episodes, ds.n_transitions, ds.obs_dim, ds.act_dim) == (3, 24, 6, 3)
    np.testing.assert_array_equal(ds.episode_lengths, [7, 12, 5])
    off = arrays["episode_offsets"]
    returns = [
        arrays["rewards"][a:b].astype(np.float64).sum()
        for a, b in zip(off[:-1], off[1:], strict=True)
    ]
    np.testing.assert_allclose(ds.episode_returns, returns)
    assert ds.episode_returns.dtype == np.float64
    success = [arrays["successes"][a:b].any() for a, b in zip(off[:-1], off[1:], strict=True)]
    np.testing.assert_array_equal(ds.episode_success, success)
    ep = ds.episode(1)
    np.testing.assert_array_equal(ep["observations"], arrays["observations"][7:19])
    np.testing.assert_array_equal(ds.episode(-1)["rewards"], arrays["rewards"][19:])
    with pytest.raises(IndexError):
        ds.episode(3)

    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["task"] == "push-v3"
    assert m["collector"] == "scripted" and m["noise"] == 0.1 and m["seed"] == 3
    assert m["n_episodes"] == 3 and m["n_transitions"] == 24
    assert m["return_stats"]["max"] == pytest.approx(max(returns))
    assert m["return_stats"]["mean"] == pytest.approx(np.mean(returns))
    assert m["success_rate"] == pytest.approx(np.mean(success))
    assert ds.manifest == m
    assert is_complete_dataset(path) and temp_dirs(path) == []


def test_write_converts_and_rejects_bad_input(tmp_path):
    arrays = make_arrays()
    arrays["observations"] = arrays["observations"].astype(np.float64).tolist()  # lists work
    ds = write_dataset(tmp_path / "a", task="a", **arrays, metadata={})
    assert ds.observations.dtype == np.float32

    bad = make_arrays()
    bad["episode_offsets"] = np.array([0, 7, 20])
    with pytest.raises(DatasetError, match="must end at the 24 transitions"):
        write_dataset(tmp_path / "b", task="b", **bad, metadata={})
    assert not (tmp_path / "b").exists() and temp_dirs(tmp_path / "b") == []

    bad = make_arrays()
    bad["rewards"][3] = np.nan
    with pytest.raises(DatasetError, match="rewards.*row 3"):
        write_dataset(tmp_path / "c", task="c", **bad, metadata={})
    with pytest.raises(DatasetError, match="reserved"):
        write_dataset(tmp_path / "d", task="d", **make_arrays(), metadata={"task": "x"})
    with pytest.raises(DatasetError, match="JSON"):
        write_dataset(tmp_path / "e", task="e", **make_arrays(), metadata={"f": object()})
    assert not any((tmp_path / n).exists() for n in "bcde")


def test_refuses_overwrite_unless_asked(ds_path):
    before = np.array(open_dataset(ds_path).observations)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_dataset(ds_path, task="hammer-v3", **make_arrays(seed=1), metadata={})
    np.testing.assert_array_equal(open_dataset(ds_path).observations, before)
    new = make_arrays(seed=1, lengths=(4, 4))
    write_dataset(ds_path, task="hammer-v3", **new, metadata={}, overwrite=True)
    ds = open_dataset(ds_path)
    np.testing.assert_array_equal(ds.observations, new["observations"])
    assert ds.n_episodes == 2 and temp_dirs(ds_path) == []


def test_open_datasets(ds_path):
    got = open_datasets(ds_path.parent, ["hammer-v3"])
    assert list(got) == ["hammer-v3"] and got["hammer-v3"].n_episodes == 3
    with pytest.raises(DatasetError, match=r"push-v3.*missing"):
        open_datasets(ds_path.parent, ["hammer-v3", "push-v3"])
    (ds_path.parent / "half").mkdir()
    with pytest.raises(DatasetError, match="half.*incomplete"):
        open_datasets(ds_path.parent, ["half"])


# ----------------------------------------------------------------------------- corruption


def _truncate(path, name):
    f = path / f"{name}.npy"
    f.write_bytes(f.read_bytes()[:-9])


def _resave(path, name, arr):
    np.save(path / f"{name}.npy", arr)


def _edit_manifest(path, **changes):
    f = path / "manifest.json"
    m = json.loads(f.read_text())
    m.update(changes)
    f.write_text(json.dumps(m))


def _obs(path):
    return np.array(np.load(path / "observations.npy"))


CORRUPTIONS = {
    "missing array": (lambda p: (p / "actions.npy").unlink(), "actions.npy", "missing"),
    "truncated array": (lambda p: _truncate(p, "observations"), "observations.npy", "truncated"),
    "truncated header": (
        lambda p: (p / "rewards.npy").write_bytes(b"\x93NUMPY"),
        "rewards.npy",
        "truncated",
    ),
    "lengths disagree": (
        lambda p: _resave(p, "actions", np.zeros((20, 3), np.float32)),
        "actions.npy",
        "length 20 disagrees with rewards.npy length 24",
    ),
    "nan": (
        lambda p: _resave(
            p, "observations", np.where(np.arange(24)[:, None] == 17, np.nan, _obs(p))
        ),
        "observations.npy",
        "NaN or inf.*row 17",
    ),
    "inf": (
        lambda p: _resave(p, "rewards", np.full(24, np.inf, np.float32)),
        "rewards.npy",
        "NaN or inf.*row 0",
    ),
    "wrong dimensions": (
        lambda p: _resave(p, "observations", np.zeros(24, np.float32)),
        "observations.npy",
        r"expected 2-d, got shape \(24,\)",
    ),
    "wrong dtype": (
        lambda p: _resave(p, "actions", np.zeros((24, 3), np.float64)),
        "actions.npy",
        "expected float32, got float64",
    ),
    "object array": (
        lambda p: np.save(p / "rewards.npy", np.array([None] * 24), allow_pickle=True),
        "rewards.npy",
        "unreadable",
    ),
    "unknown version": (
        lambda p: _edit_manifest(p, format_version=99),
        "manifest.json",
        "unknown format version 99",
    ),
    "manifest counts": (
        lambda p: _edit_manifest(p, n_transitions=25),
        "manifest.json",
        "n_transitions is 25 but the arrays hold 24",
    ),
    "manifest missing": (lambda p: (p / "manifest.json").unlink(), "manifest.json", "missing"),
    "manifest not json": (
        lambda p: (p / "manifest.json").write_text("{"),
        "manifest.json",
        "cannot read",
    ),
    "offsets not monotone": (
        lambda p: _resave(p, "episode_offsets", np.array([0, 12, 7, 24])),
        "episode_offsets.npy",
        "not strictly increasing",
    ),
    "offsets wrong end": (
        lambda p: _resave(p, "episode_offsets", np.array([0, 7, 19, 23])),
        "episode_offsets.npy",
        "must end at the 24 transitions, got 23",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_reported(ds_path, case):
    corrupt, file, message = CORRUPTIONS[case]
    corrupt(ds_path)
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(ds_path)
    assert str(ds_path / file) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_finite_check_reads_in_chunks(ds_path, monkeypatch):
    # force many small chunks so a NaN in a late chunk is found with its row
    monkeypatch.setattr(fmt, "_FINITE_CHUNK_BYTES", 3 * 6 * 4)
    open_dataset(ds_path)
    obs = _obs(ds_path)
    obs[22, 4] = -np.inf
    _resave(ds_path, "observations", obs)
    with pytest.raises(DatasetError, match="observations.npy.*row 22"):
        open_dataset(ds_path)
    assert open_dataset(ds_path, check_finite=False).n_transitions == 24


# ----------------------------------------------------------------------------- atomicity


def _failing_writer(after: int):
    real, calls = fmt._write_file, []

    def write(file, fn):
        if len(calls) == after:
            raise RuntimeError("disk full (simulated)")
        calls.append(file)
        real(file, fn)

    return write


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "_write_file", _failing_writer(after=2))
    path = tmp_path / "push-v3"
    with pytest.raises(RuntimeError, match="simulated"):
        write_dataset(path, task="push-v3", **make_arrays(), metadata={})
    assert not path.exists() and not is_complete_dataset(path)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous(ds_path, monkeypatch):
    before = _obs(ds_path)
    monkeypatch.setattr(fmt, "_write_file", _failing_writer(after=5))  # fails on manifest
    with pytest.raises(RuntimeError, match="simulated"):
        write_dataset(ds_path, task="x", **make_arrays(seed=5), metadata={}, overwrite=True)
    ds = open_dataset(ds_path)
    np.testing.assert_array_equal(ds.observations, before)
    assert ds.task == "hammer-v3" and temp_dirs(ds_path) == []


def _killed_writer(path, kill_code: str, overwrite=False) -> subprocess.CompletedProcess:
    """Run write_dataset in a child process that ``kill_code`` kills with os._exit(3)."""
    write = textwrap.dedent(
        f"""
        n = 10
        fmt.write_dataset({str(path)!r}, task="new", observations=np.zeros((n, 2)),
            actions=np.zeros((n, 1)), rewards=np.zeros(n), successes=np.zeros(n, bool),
            episode_offsets=[0, n], metadata={{}}, overwrite={overwrite})
        """
    )
    code = "import os\nimport numpy as np\nfrom eva_rl.data import format as fmt\n"
    code += kill_code + write
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


KILL_ON_4TH_FILE = """
real, calls = fmt._write_file, []
def write(file, fn):
    if len(calls) == 3:
        os._exit(3)
    calls.append(file)
    real(file, fn)
fmt._write_file = write
"""

KILL_BETWEEN_RENAMES = """
real, calls = os.rename, []
def rename(a, b):
    if calls:
        os._exit(3)
    calls.append(a)
    real(a, b)
fmt.os.rename = rename
"""


def test_killed_write_is_detectable_and_cleanable(tmp_path):
    """A process killed mid-write (no cleanup runs) leaves only a recognisable temp dir."""
    path = tmp_path / "push-v3"
    proc = _killed_writer(path, KILL_ON_4TH_FILE)
    assert proc.returncode == 3, proc.stderr
    assert not path.exists() and not is_complete_dataset(path)
    leftovers = temp_dirs(path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".push-v3.tmp-")
    assert not is_complete_dataset(leftovers[0])
    assert remove_temp_dirs(path) == leftovers and list(tmp_path.iterdir()) == []


def test_killed_overwrite_keeps_previous(ds_path):
    before = _obs(ds_path)
    proc = _killed_writer(ds_path, KILL_ON_4TH_FILE, overwrite=True)
    assert proc.returncode == 3, proc.stderr
    np.testing.assert_array_equal(open_dataset(ds_path).observations, before)
    assert len(remove_temp_dirs(ds_path)) == 1 and temp_dirs(ds_path) == []

    # killed after moving the old dataset aside, before renaming the new one in
    proc = _killed_writer(ds_path, KILL_BETWEEN_RENAMES, overwrite=True)
    assert proc.returncode == 3, proc.stderr
    assert not ds_path.exists()
    names = sorted(p.name[: len(".hammer-v3.old")] for p in temp_dirs(ds_path))
    assert names == [".hammer-v3.old", ".hammer-v3.tmp"]
    removed = remove_temp_dirs(ds_path)  # restores the old one, drops the new half
    assert len(removed) == 1 and temp_dirs(ds_path) == []
    ds = open_dataset(ds_path)
    assert ds.task == "hammer-v3"
    np.testing.assert_array_equal(ds.observations, before)


def test_overwrite_refuses_foreign_directory(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dataset"):
        write_dataset(foreign, task="x", **make_arrays(), metadata={}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", task="x", **make_arrays(), metadata={}, overwrite=True)
    assert is_complete_dataset(tmp_path / "empty")


# ----------------------------------------------------------------------------- importer


def _write_npz(file, n_episodes=3, episode_length=10, dones_mode="none", seed=0, **extra):
    rng = np.random.default_rng(seed)
    n = n_episodes * episode_length
    obs_all = rng.normal(size=(n + n_episodes, 5))  # one extra final obs per episode
    obs, next_obs = [], []
    for e in range(n_episodes):
        block = obs_all[e * (episode_length + 1) : (e + 1) * (episode_length + 1)]
        obs.append(block[:-1])
        next_obs.append(block[1:])
    obs, next_obs = np.concatenate(obs), np.concatenate(next_obs)
    dones = np.zeros(n)
    if dones_mode == "all":
        dones[episode_length - 1 :: episode_length] = 1.0
    data = {
        "observations": obs,
        "next_observations": next_obs,
        "actions": rng.uniform(-1, 1, size=(n, 2)),
        "rewards": rng.uniform(0, 5, size=n),
        "dones": dones,
    }
    data.update(extra)
    np.savez(file, **data)
    return data


@pytest.mark.parametrize("dones_mode", ["none", "all"])
def test_import_npz(tmp_path, dones_mode):
    data = _write_npz(tmp_path / "hammer.npz", dones_mode=dones_mode)
    ds = import_npz(tmp_path / "hammer.npz", tmp_path / "hammer-v3", "hammer-v3", 10)
    assert ds.task == "hammer-v3" and ds.n_episodes == 3 and ds.n_transitions == 30
    np.testing.assert_array_equal(ds.episode_offsets, [0, 10, 20, 30])
    np.testing.assert_allclose(ds.observations, data["observations"].astype(np.float32))
    np.testing.assert_allclose(ds.rewards, data["rewards"].astype(np.float32))
    np.testing.assert_allclose(
        ds.episode_returns, data["rewards"].astype(np.float32).reshape(3, 10).sum(1), rtol=1e-6
    )
    assert not ds.successes.any()
    m = ds.manifest
    assert m["successes_known"] is False and m["next_obs_mismatches"] == 0
    assert m["collector"] == "import_npz" and m["source"].endswith("hammer.npz")
    assert is_complete_dataset(tmp_path / "hammer-v3")


def test_import_npz_terminal_dones_and_wrong_length(tmp_path, monkeypatch):
    monkeypatch.setattr(importers, "_CHUNK_ROWS", 4)  # the next_obs check runs in chunks
    # episodes of 10 steps, but the second ends early (done at its step 4 of 10)
    data = _write_npz(tmp_path / "a.npz", n_episodes=3, episode_length=10)
    dones = np.zeros(30)
    dones[13] = 1
    np.savez(tmp_path / "b.npz", **{**data, "dones": dones})
    ds = import_npz(tmp_path / "b.npz", tmp_path / "b", "b", episode_length=10,
                    incomplete_tail="keep")
    np.testing.assert_array_equal(ds.episode_offsets, [0, 10, 14, 24, 30])
    assert ds.manifest["dropped_tail_steps"] == 0
    # a wrong episode_length shows up as next_observations mismatches
    ds = import_npz(tmp_path / "a.npz", tmp_path / "c", "c", episode_length=15)
    assert ds.manifest["next_obs_mismatches"] == 2


def test_import_npz_success_rule_and_shapes(tmp_path):
    rewards = np.array([[1.0], [10.0], [3.0], [10.0]])  # SB3-style (N, 1)
    np.savez(
        tmp_path / "r.npz",
        observations=np.zeros((4, 3)),
        actions=np.zeros((4, 1)),
        rewards=rewards,
        dones=np.zeros((4, 1)),
    )
    ds = import_npz(tmp_path / "r.npz", tmp_path / "r", "r", 2, success_reward=10.0)
    np.testing.assert_array_equal(ds.successes, [False, True, False, True])
    assert ds.manifest["success_rule"] == "reward >= 10.0"
    assert "next_obs_mismatches" not in ds.manifest


def test_import_npz_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        import_npz(tmp_path / "nope.npz", tmp_path / "x", "x")
    np.savez(tmp_path / "k.npz", observations=np.zeros((4, 3)), rewards=np.zeros(4))
    with pytest.raises(DatasetError, match=r"k.npz.*missing keys \['actions'\]"):
        import_npz(tmp_path / "k.npz", tmp_path / "x", "x")
    np.savez(
        tmp_path / "o.npz",
        observations=np.zeros((4, 3)),
        actions=np.zeros((4, 1)),
        rewards=np.array([None] * 4),
    )
    with pytest.raises(DatasetError, match="o.npz.*pickled"):
        import_npz(tmp_path / "o.npz", tmp_path / "x", "x")
    np.savez(
        tmp_path / "l.npz",
        observations=np.zeros((4, 3)),
        actions=np.zeros((3, 1)),
        rewards=np.zeros(4),
    )
    with pytest.raises(DatasetError, match="'actions' has 3 rows but 'observations' has 4"):
        import_npz(tmp_path / "l.npz", tmp_path / "x", "x")
    np.savez(
        tmp_path / "n.npz",
        observations=np.zeros((4, 3)),
        next_observations=np.zeros((4, 2)),
        actions=np.zeros((4, 1)),
        rewards=np.zeros(4),
    )
    with pytest.raises(DatasetError, match="n.npz.*'next_observations' has shape"):
        import_npz(tmp_path / "n.npz", tmp_path / "x", "x")
    (tmp_path / "z.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="z.npz.*cannot read"):
        import_npz(tmp_path / "z.npz", tmp_path / "x", "x")
    assert not (tmp_path / "x").exists()


def test_import_npz_trailing_piece_without_done(tmp_path, caplog):
    """The flat L2M layout: a last piece without done, shorter than an episode."""
    rng = np.random.default_rng(3)
    n = 27  # episodes of 10 steps: ends at 6 (done), 16 (length), 26 (length); 1 step left
    dones = np.zeros(n)
    dones[5] = 1
    arrays = {"observations": rng.normal(size=(n, 4)), "actions": rng.uniform(-1, 1, (n, 2)),
              "rewards": rng.uniform(0, 1, n), "dones": dones}
    np.savez(tmp_path / "buf.npz", **arrays)
    with caplog.at_level("INFO", logger="eva_rl.data.importers"):
        ds = import_npz(tmp_path / "buf.npz", tmp_path / "drop", "t", 10)  # L2M's default
    np.testing.assert_array_equal(ds.episode_offsets, [0, 6, 16, 26])
    np.testing.assert_array_equal(ds.observations, arrays["observations"][:26].astype(np.float32))
    assert ds.manifest["dropped_tail_steps"] == 1 and ds.manifest["incomplete_tail"] == "drop"
    assert ds.manifest["source_layout"] == "buffer"
    assert "dropped the trailing 1 steps" in caplog.text
    kept = import_npz(tmp_path / "buf.npz", tmp_path / "keep", "t", 10, incomplete_tail="keep")
    np.testing.assert_array_equal(kept.episode_offsets, [0, 6, 16, 26, 27])
    with pytest.raises(DatasetError, match="last 1 steps end without done"):
        import_npz(tmp_path / "buf.npz", tmp_path / "e", "t", 10, incomplete_tail="error")
    # a done on the last step, or a full-length last piece, is a finished episode
    np.savez(tmp_path / "done.npz", **{**arrays, "dones": np.r_[dones[:-1], 1.0]})
    ds = import_npz(tmp_path / "done.npz", tmp_path / "d", "t", 10)
    assert ds.manifest["dropped_tail_steps"] == 0 and ds.n_transitions == 27
    np.savez(tmp_path / "one.npz", **{k: v[:4] for k, v in arrays.items()}, )
    with pytest.raises(DatasetError, match="only episode \\(4 steps\\)"):
        import_npz(tmp_path / "one.npz", tmp_path / "o", "t", 10)
    with pytest.raises(ValueError, match="incomplete_tail must be one of"):
        import_npz(tmp_path / "buf.npz", tmp_path / "x", "t", 10, incomplete_tail="trim")


def _write_episode_dir(directory, lengths, obs_dim=4, act_dim=2, seed=0):
    """L2M's per-episode layout: one file per episode, scalar dones, float32 arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    episodes = []
    for i, t in enumerate(lengths):
        ep = {"states": rng.normal(size=(t, obs_dim)).astype(np.float32),
              "actions": rng.uniform(-1, 1, (t, act_dim)).astype(np.float32),
              "rewards": rng.uniform(0, 10, t).astype(np.float32),
              "dones": np.array(i % 2 == 0)}
        ep["returns_to_go"] = np.cumsum(ep["rewards"][::-1])[::-1].astype(np.float32)
        np.savez(directory / f"{i}.npz", **ep)
        episodes.append(ep)
    return episodes


def test_import_npz_per_episode_directory(tmp_path):
    lengths = [5, 3, 7, 4, 6, 2, 5, 5, 3, 8, 4]  # 11 files: "10.npz" sorts after "9.npz"
    episodes = _write_episode_dir(tmp_path / "eps", lengths)
    (tmp_path / "eps" / "notes.txt").write_text("not an episode")
    ds = import_npz(tmp_path / "eps", tmp_path / "out", "t", success_reward=9.5)
    np.testing.assert_array_equal(ds.episode_offsets, np.r_[0, np.cumsum(lengths)])
    np.testing.assert_array_equal(ds.observations, np.concatenate([e["states"] for e in episodes]))
    np.testing.assert_array_equal(ds.actions, np.concatenate([e["actions"] for e in episodes]))
    np.testing.assert_array_equal(ds.rewards, np.concatenate([e["rewards"] for e in episodes]))
    np.testing.assert_array_equal(ds.successes, ds.rewards >= 9.5)
    m = ds.manifest
    assert m["source_layout"] == "episodes" and m["n_files"] == 11
    assert m["terminal_episodes"] == 6
    assert m["source_keys"] == ["actions", "dones", "rewards", "states"]


def test_import_npz_per_episode_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "0.pkl").write_bytes(b"x")
    with pytest.raises(DatasetError, match="no per-episode .npz files.*0.pkl"):
        import_npz(tmp_path / "empty", tmp_path / "x", "t")
    _write_episode_dir(tmp_path / "d", [3, 4])
    np.savez(tmp_path / "d" / "2.npz", states=np.zeros((3, 4)), actions=np.zeros((3, 2)),
             rewards=np.zeros(3), dones=np.zeros(3))
    with pytest.raises(DatasetError, match="2.npz: 'dones' should be a scalar"):
        import_npz(tmp_path / "d", tmp_path / "x", "t")
    np.savez(tmp_path / "d" / "2.npz", states=np.zeros((3, 5)), actions=np.zeros((3, 2)),
             rewards=np.zeros(3), dones=np.array(True))
    with pytest.raises(DatasetError, match="2.npz: 'states' rows have shape \\(5,\\)"):
        import_npz(tmp_path / "d", tmp_path / "x", "t")
    np.savez(tmp_path / "d" / "2.npz", states=np.zeros((3, 4)), actions=np.zeros((2, 2)),
             rewards=np.zeros(3), dones=np.array(True))
    with pytest.raises(DatasetError, match="'actions' has 2 rows but 'states' has 3"):
        import_npz(tmp_path / "d", tmp_path / "x", "t")
    # one per-episode file given as if it were a flat buffer: the error names both layouts
    with pytest.raises(DatasetError, match="missing keys \\['observations'\\].*per-episode"):
        import_npz(tmp_path / "d" / "0.npz", tmp_path / "x", "t")
    assert not (tmp_path / "x").exists()


def test_episode_offsets_from_dones():
    np.testing.assert_array_equal(episode_offsets_from_dones(7, None, 3), [0, 3, 6, 7])
    dones = np.array([0, 1, 0, 0, 0, 0, 1, 0], bool)
    np.testing.assert_array_equal(episode_offsets_from_dones(8, dones, 3), [0, 2, 5, 7, 8])
    dones = np.array([0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(episode_offsets_from_dones(6, dones, 3), [0, 3, 6])
