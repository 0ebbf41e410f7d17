"""Where the cells of an experiment run: here, one after another, or as Ray tasks.

    run_experiment(exp, "runs/cw10", executor=LocalExecutor())
    run_experiment(exp, "runs/cw10", executor=RayExecutor(cpus_per_cell=1))  # this machine
    run_experiment(exp, "runs/cw10", executor=RayExecutor(address="head:6379", gpus_per_cell=0.25))

An executor only decides where `agents.protocols.run_cell` runs; every cell writes its own
directory and continues from its latest checkpoint when it is run again, so the two
executors give the same results and a run started with one can be resumed with the other.
On a cluster the run directory (and the data and pretrained run) must be on a filesystem
that every node mounts at the same path; a cell that cannot see it fails with an error
that says so (`agents.protocols.RunDirNotVisible`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from agents.protocols import Cell, Experiment, TaskHook, run_cell

logger = logging.getLogger(__name__)

RAY_EXTRA_HINT = 'Ray is not installed: pip install -e ".[ray]" (or pip install ray)'
CONNECT_TIMEOUT_S = 5.0


class Executor(Protocol):
    """Runs cells; ``run`` yields each cell when it has finished (in any order)."""

    def check(self) -> None:
        """Fail (ValueError, one line) before anything is written if cells cannot run."""

    def run(self, exp: Experiment, out: Path, cells: Sequence[Cell],
            hook: TaskHook | None = None) -> Iterator[Cell]: ...


class LocalExecutor:
    """The cells one after another in this process (the default)."""

    def check(self) -> None:
        """Nothing to check: this process runs everything."""

    def run(self, exp: Experiment, out: Path, cells: Sequence[Cell],
            hook: TaskHook | None = None) -> Iterator[Cell]:
        for cell in cells:
            run_cell(exp, out, cell, hook)
            yield cell


def _run_cell_task(exp_dict: dict[str, Any], out: str, cell: Cell, hook: TaskHook | None,
                   threads: int) -> str:
    """The body of one Ray task (runs in a Ray worker, maybe on another node)."""
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    exp = Experiment.from_dict(exp_dict)
    run_cell(exp, out, cell, hook)
    return socket.gethostname()


class RayExecutor:
    """Each cell a Ray task, retried (from its latest checkpoint) when its worker or node dies.

    Args:
        address: a running cluster (``host:port`` of ``ray start --head``, or ``auto``);
            None starts a local Ray on this machine with every core.
        cpus_per_cell: Ray CPUs of one cell (also its torch threads).
        gpus_per_cell: Ray GPUs of one cell; fractions pack cells on one GPU (0.25: four).
        max_retries: how often a cell whose worker died is started again (Ray's retries).
        runtime_env: passed to ``ray.init`` (e.g. ``{"env_vars": {...}}``).
    """

    def __init__(self, address: str | None = None, cpus_per_cell: float = 1,
                 gpus_per_cell: float = 0, max_retries: int = 2,
                 runtime_env: dict[str, Any] | None = None) -> None:
        if cpus_per_cell <= 0 or gpus_per_cell < 0:
            raise ValueError(f"need cpus_per_cell > 0 and gpus_per_cell >= 0, got "
                             f"{cpus_per_cell} and {gpus_per_cell}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self._ray: Any = None

    # ------------------------------------------------------------------ cluster

    def check(self) -> None:
        """Import Ray, join or start the cluster, and check a node can hold one cell (once
        per connection: `run` calls it too, for callers that did not)."""
        if self._ray is None:
            self._connect()
            self._check_resources()

    def _connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError(RAY_EXTRA_HINT) from None
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address)
        try:
            ray.init(address=self.address or "local", include_dashboard=False,
                     runtime_env=self.runtime_env, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ValueError(f"cannot join the Ray cluster at {self.address}: "
                             f"{str(err).splitlines()[0]}") from None
        self._ray = ray
        logger.info("Ray: %s", ray.cluster_resources())

    def _check_resources(self) -> None:
        need = {"CPU": float(self.cpus_per_cell), "GPU": float(self.gpus_per_cell)}
        nodes = [n["Resources"] for n in self._ray.nodes() if n.get("Alive")]
        if not any(all(res.get(k, 0.0) >= v for k, v in need.items() if v > 0)
                   for res in nodes):
            have = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}" for r in nodes)
            self.shutdown()
            raise ValueError(
                f"no node of the Ray cluster can hold one cell ({need['CPU']:g} CPU, "
                f"{need['GPU']:g} GPU per cell; nodes have: {have or 'none'}); lower "
                "--cpus-per-cell / --gpus-per-cell or add nodes")

    def shutdown(self) -> None:
        """Disconnect (and stop a local Ray this executor started)."""
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    # ------------------------------------------------------------------ running

    def run(self, exp: Experiment, out: Path, cells: Sequence[Cell],
            hook: TaskHook | None = None) -> Iterator[Cell]:
        self.check()
        ray = self._ray
        task = ray.remote(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                          max_retries=self.max_retries)(_run_cell_task)
        threads = max(1, int(self.cpus_per_cell))
        exp_dict = exp.to_dict()
        exp_dict["config"]["train"]["progress"] = False  # the driver shows the cells' bar
        refs = {task.remote(exp_dict, str(out), cell, hook, threads): cell for cell in cells}
        try:
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                cell = refs.pop(ref)
                try:
                    host = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise err.cause from None  # the cell's own exception, not Ray's wrapper
                except ray.exceptions.RayError as err:  # worker or node died, retries spent
                    raise RuntimeError(
                        f"cell {cell.label(exp)} failed on Ray after {self.max_retries} "
                        f"retries: {str(err).splitlines()[0]}") from None
                logger.info("%s finished on %s", cell.label(exp), host)
                yield cell
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            self.shutdown()


def _check_reachable(address: str) -> None:
    """A quick TCP connect, so an unreachable head fails in seconds, not after Ray's retries."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address must be host:port (or auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ValueError(f"cannot reach a Ray cluster at {address}: {err.strerror or err}"
                         ) from None

