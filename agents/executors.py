"""Where independent pieces of work run: here, one after another, or as Ray tasks.

    for item in executor.run(work, items):  # each item when work(item) has finished
        ...
    run_experiment(exp, "runs/cw10", executor=RayExecutor(cpus_per_cell=1))  # this machine
    run_experiment(exp, "runs/cw10", executor=RayExecutor(address="head:6379", gpus_per_cell=0.25))

An executor knows nothing of experiments: it calls a function on items and says when each
is done. The fine-tuning protocols (`agents.protocols`) hand it their cells, each of which
writes its own directory and continues from its latest checkpoint when it is run again, so
the two executors give the same results and a run started with one can be resumed with
the other. For Ray the function and items must pickle (a module-level function, or a
`functools.partial` of one); on a cluster every node must see the files the work reads and
writes at the same paths.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from agents.reaper import Reaper

logger = logging.getLogger(__name__)

RAY_EXTRA_HINT = 'Ray is not installed: pip install -e ".[ray]" (or pip install ray)'
CONNECT_TIMEOUT_S = 5.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Item = TypeVar("Item")


class Executor(Protocol):
    """Calls a function on items; ``run`` yields each item when its call has finished (in
    any order)."""

    in_process: bool
    """Whether the calls run in this process (so their own progress bars show here)."""

    def check(self) -> None:
        """Fail (ValueError, one line) before anything is written if nothing can run."""

    def run(self, work: Callable[[Item], Any], items: Sequence[Item],
            label: Callable[[Item], str] = str) -> Iterator[Item]:
        """``work(item)`` for every item; ``label(item)`` names one in messages."""
        ...


class LocalExecutor:
    """The items one after another in this process (the default)."""

    in_process = True

    def check(self) -> None:
        """Nothing to check: this process runs everything."""

    def run(self, work: Callable[[Item], Any], items: Sequence[Item],
            label: Callable[[Item], str] = str) -> Iterator[Item]:
        for item in items:
            work(item)
            yield item


def _remote_call(work: Callable[[Any], Any], item: Any, threads: int) -> str:
    """The body of one Ray task (runs in a Ray worker, maybe on another node): returns the
    worker's host name."""
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    work(item)
    return socket.gethostname()


_CANCEL_WAIT_S = 10.0  # how long a stopping run waits for Ray to confirm its cancellations


class RayExecutor:
    """Each item a Ray task, retried when its worker or node dies (a fine-tuning cell then
    continues from its latest checkpoint).

    A local Ray this executor starts is stopped with it: by `shutdown` (also when ``run``
    ends, fails or is interrupted by SIGINT / SIGTERM) and, if this process is killed
    (``kill -9``), by an `agents.reaper.Reaper` (Ray's agents would outlive it by a minute).

    Args:
        address: a running cluster (``host:port`` of ``ray start --head``, or ``auto``);
            None starts a local Ray on this machine with every core.
        cpus_per_cell: Ray CPUs of one cell (also its torch threads).
        gpus_per_cell: Ray GPUs of one cell; fractions pack cells on one GPU (0.25: four).
        max_retries: how often a cell whose worker died is started again (Ray's retries).
        runtime_env: passed to ``ray.init`` (e.g. ``{"env_vars": {...}}``).
    """

    in_process = False

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
        self._reaper: Reaper | None = None

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
        # a Ray this process starts dies with it, also when killed during ray.init
        reaper = Reaper.start() if self.address in (None, "local") else None
        try:
            self._init(ray)
        except BaseException:
            if reaper is not None:
                reaper.stop()
            raise
        self._ray, self._reaper = ray, reaper
        logger.info("Ray: %s", ray.cluster_resources())

    def _init(self, ray: Any) -> None:
        try:
            with _own_signal_handlers():
                ray.init(address=self.address or "local", include_dashboard=False,
                         runtime_env=self.runtime_env, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ValueError(f"cannot join the Ray cluster at {self.address}: "
                             f"{str(err).splitlines()[0]}") from None
        except (KeyboardInterrupt, SystemExit) as err:
            ray.shutdown()  # stop what ray.init had started
            if isinstance(err, SystemExit):
                # SIGTERM while ray.init ran: Ray's own handler exits; hand the signal to
                # this process's handler, in place again by now
                signal.raise_signal(signal.SIGTERM)
            raise

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
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None

    # ------------------------------------------------------------------ running

    def run(self, work: Callable[[Item], Any], items: Sequence[Item],
            label: Callable[[Item], str] = str) -> Iterator[Item]:
        self.check()
        ray = self._ray
        task = ray.remote(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                          max_retries=self.max_retries)(_remote_call)
        threads = max(1, int(self.cpus_per_cell))
        work_ref = ray.put(work)
        refs = {task.remote(work_ref, item, threads): item for item in items}
        try:
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                item = refs.pop(ref)
                try:
                    host = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise err.cause from None  # the cell's own exception, not Ray's wrapper
                except ray.exceptions.RayError as err:  # worker or node died, retries spent
                    raise RuntimeError(
                        f"{label(item)} failed on Ray after {self.max_retries} "
                        f"retries: {str(err).splitlines()[0]}") from None
                logger.info("%s finished on %s", label(item), host)
                yield item
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            if refs:  # let the cancellations land: shutting down while a cancelled task's
                # reply is still in flight has aborted Ray's core worker (task_manager.cc)
                ray.wait(list(refs), num_returns=len(refs), timeout=_CANCEL_WAIT_S)
            self.shutdown()


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """Keep this process's SIGINT / SIGTERM handlers across ``ray.init``.

    ``ray.init`` installs a Python SIGTERM handler, and its C++ core worker a crash
    handler that prints a stack dump and aborts (exit 134) on SIGTERM; either way a
    driver's ``finally`` blocks and locks would not run. Setting the previous handlers
    again (also at the C level) lets a script's own handling (``scripts/script_cli.py``:
    cancel the cells, stop Ray, one line) or Python's default stop the driver."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


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

