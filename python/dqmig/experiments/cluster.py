"""Where a sweep's runs execute: here, one after another, or as tasks on a Dask cluster.

A run is a task (`Task`: a point, a policy, a repetition, the scenario at that point and the
seed). `run_tasks` hands each finished run to `on_result` as it arrives, in whatever order
the runs finish, so a sweep can append it to its journal at once (`journal.py`) and an
interrupted sweep keeps every run that finished.

On Dask (`dask[distributed]`, the `cluster` extra, imported only here and only when used):
- `--cluster tcp://HOST:8786` joins a running scheduler (`dask scheduler`, `dask worker`);
  an unreachable one is a clear error within CONNECT_TIMEOUT_S;
- `--workers N` starts a local cluster of N worker processes (one thread each).
An emulator run asks for the resource `host=1`: start one `dask worker ... --resources
host=1` per host, so two emulated guests never share a host and measure each other. A local
cluster for a sweep with emulator runs has one worker (they would share this host). A
simulator run needs one core.
A worker that dies mid-run loses that run only: the scheduler reruns it elsewhere, at most
RETRIES more times on a local cluster (a running scheduler's `distributed.scheduler.
allowed-failures`, default 3, bounds it there); `retried` in the run says how many more
attempts it took. A run that raises is not retried (the simulator is deterministic: it would
raise again); it is reported as failed and the sweep goes on."""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dqmig.experiments import results, runner
from dqmig.experiments.scenario import ScenarioError, parse

CONNECT_TIMEOUT_S = 10.0
RETRIES = 2
POLL_S = 2.0  # how often the driver looks at the cluster's workers while no run finishes
WAIT_S = 0.05  # how often it looks for finished runs
NO_WORKER_S = 60.0  # runs left with no worker that could take them: an error after this long
# Fault injection for the tests: a worker running the first attempt of a run whose key is in
# this variable ("point-policy-repeat") exits at once, as a killed worker would ("...*": every
# attempt).
KILL_ENV = "DQMIG_X_KILL_WORKER_AT"


class ClusterError(RuntimeError):
    """A cluster that cannot be used (unreachable or lost, dask not installed)."""


@dataclass(frozen=True)
class Task:
    point: int
    policy: str
    repeat: int
    scenario: dict[str, Any]  # the scenario at this point, as Scenario.to_dict
    seed: int
    sweep_id: str = ""  # names the run's attempt counter on a shared scheduler

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.point, self.policy, self.repeat)

    @property
    def engine(self) -> str:
        return str(self.scenario.get("engine", "emu"))


def execute(task: Task) -> dict[str, Any]:
    """One run, wherever it executes: the result, with the host it ran on."""
    scenario = parse(task.scenario, f"sweep point {task.point}")
    result = runner.run(scenario, task.policy, seed=task.seed, keep_series=False)
    result["point"], result["repeat"] = task.point, task.repeat
    result["machine"] = {**results.machine_facts(), "hostname": _hostname()}
    return result


def _hostname() -> str:
    import socket

    return socket.gethostname()


def run_tasks(
    tasks: Iterable[Task],
    on_result: Callable[[dict[str, Any]], None],
    on_failure: Callable[[Task, str], None],
    *,
    cluster: str | None = None,
    workers: int | None = None,
    on_state: Callable[[int], None] | None = None,
) -> None:
    """Runs every task, here (neither `cluster` nor `workers`) or on Dask. `on_result` gets
    each result as it finishes, `on_failure` each run that raised (or, on Dask, whose worker
    died on every attempt) with the reason: the other runs go on. `on_state(running)` follows
    how many runs are executing now."""
    tasks = list(tasks)
    if cluster is None and workers is None:
        for task in tasks:
            if on_state:
                on_state(1)
            try:
                result = execute(task)
            except Exception as e:  # noqa: BLE001  (a failed run is reported, the sweep goes on)
                on_failure(task, f"{type(e).__name__}: {e}")
                continue
            on_result(result)
        return
    with _client(cluster, workers, tasks) as client:
        _run_on(client, tasks, on_result, on_failure, on_state)


def _client(cluster: str | None, workers: int | None, tasks: list[Task]) -> Any:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError("--cluster/--workers need Dask: pip install 'dqmig[cluster]'") from None
    if cluster is not None:
        return _connect(Client, cluster)
    if workers is None or not 1 <= workers <= (os.cpu_count() or 1):
        raise ScenarioError(
            f"--workers {workers}: must be 1..{os.cpu_count() or 1} (this host's CPUs; "
            "more worker processes would only share them)"
        )
    if workers > 1 and any(t.engine == "emu" for t in tasks):
        print("dqmig: emulator runs: one worker on this host (two emulated guests would measure each other)",
              file=sys.stderr)  # fmt: skip
        workers = 1
    import dask

    # A worker holds only the run it executes (saturation 1): when it dies, no run queued
    # behind it is counted against its own retries.
    config = {"distributed.scheduler.allowed-failures": RETRIES, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config):
        local = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, resources={"host": 1}
        )
    return _OwnedClient(Client(local, set_as_default=False), local)


ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _connect(client_class: Any, address: str) -> Any:
    """A client of the scheduler at `address`, or ClusterError within CONNECT_TIMEOUT_S and
    a few seconds: a port that accepts but never speaks Dask's protocol would otherwise hold
    the handshake forever."""
    m = ADDRESS.match(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ClusterError(f"--cluster {address!r}: expected tcp://HOST:PORT (the Dask scheduler's address)")
    _reachable(address, m.group(2).strip("[]"), int(m.group(3)))
    got: list[Any] = []

    def connect() -> None:
        try:
            got.append(client_class(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False))
        except BaseException as e:  # noqa: BLE001  (any failure is the one error below)
            got.append(e)

    thread = threading.Thread(target=connect, name="dqmig-dask-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 5)
    if not got or isinstance(got[0], BaseException):
        why = f": {got[0]}" if got else " (it accepted the connection but did not answer as a Dask scheduler)"
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT_S:g} s{why}")
    return got[0]


def _reachable(address: str, host: str, port: int) -> None:
    """A TCP connection to the scheduler within CONNECT_TIMEOUT_S (refused: retried, as a
    scheduler may be starting), else ClusterError; an unknown host fails at once."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            left = max(0.1, deadline - time.monotonic())
            socket.create_connection((host, port), timeout=left).close()
            return
        except ConnectionRefusedError as e:
            if time.monotonic() >= deadline:
                within = f"within {CONNECT_TIMEOUT_S:g} s"
                raise ClusterError(f"cannot reach the Dask scheduler at {address} {within}: {e}") from None
            time.sleep(0.2)
        except OSError as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {e}") from None


class _OwnedClient:
    """A client and the local cluster it owns, closed together."""

    def __init__(self, client: Any, local: Any) -> None:
        self.client, self.local = client, local

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.local.close()


def _run_on(
    client: Any,
    tasks: list[Task],
    on_result: Callable[[dict[str, Any]], None],
    on_failure: Callable[[Task, str], None],
    on_state: Callable[[int], None] | None,
) -> None:
    from distributed import as_completed

    futures = {}
    for task in tasks:
        resources = {"host": 1} if task.engine == "emu" else None
        f = client.submit(
            _attempt,
            task,
            key=f"dqmig-{task.sweep_id}-{task.point}-{task.policy}-{task.repeat}-{time.time_ns()}",
            resources=resources,
            pure=False,
        )
        futures[f] = task
    arriving = as_completed(list(futures), loop=client.loop, raise_errors=False)
    idle_since = checked = time.monotonic()
    while futures:
        if not arriving.has_ready():
            time.sleep(WAIT_S)
            if time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                idle_since = _check_workers(client, futures.values(), idle_since)
            continue
        idle_since = time.monotonic()
        for f in arriving.next_batch(block=False):
            task = futures.pop(f)
            if f.status == "cancelled":  # the scheduler was lost (or shut down): nothing more will finish
                unfinished = len(futures) + 1
                raise ClusterError(f"lost the Dask scheduler with {unfinished} run(s) left; finished ones are kept")
            if f.status == "error":
                on_failure(task, _reason(f.exception()))
            else:
                on_result(f.result())
            f.release()  # the worker drops the result: a later death of it does not rerun this run
        if on_state:
            on_state(_running(client, {f.key for f in futures}))


def _check_workers(client: Any, waiting: Iterable[Task], idle_since: float) -> float:
    """While nothing finishes: ClusterError once the runs left have had no worker that could
    take them for NO_WORKER_S (none at all, or none with `host` for an emulator run)."""
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except TypeError:  # an older distributed without n_workers
        workers = client.scheduler_info()["workers"].values()
    except (OSError, TimeoutError):
        return idle_since
    need_host = any(t.engine == "emu" for t in waiting)
    able = [w for w in workers if not need_host or w.get("resources", {}).get("host", 0) >= 1]
    if able:
        return time.monotonic()
    if time.monotonic() - idle_since < NO_WORKER_S:
        return idle_since
    what = "no worker with the resource host=1 (dask worker ... --resources host=1)" if need_host else "no worker"
    raise ClusterError(f"no run can start: the scheduler has had {what} for {NO_WORKER_S:g} s")


def _reason(error: BaseException) -> str:
    if type(error).__name__ == "KilledWorker":
        return f"the worker running it died on every attempt the scheduler allows (allowed-failures): {error}"
    return f"{type(error).__name__}: {error}"


def _running(client: Any, keys: set[str]) -> int:
    """How many of the unfinished runs a worker is running now (the rest wait in a queue)."""
    try:
        processing = client.processing()
    except (OSError, TimeoutError):
        return 0
    return sum(1 for ks in processing.values() for k in ks if k in keys)


def _attempt(task: Task) -> dict[str, Any]:
    """`execute`, counting attempts in the scheduler's metadata: a Dask retry reruns the same
    task on another worker after this one died."""
    from distributed import get_client

    client = get_client()
    key = ["dqmig-attempts", task.sweep_id, f"{task.point}-{task.policy}-{task.repeat}"]
    n = int(client.get_metadata(key, default=0)) + 1
    client.set_metadata(key, n)
    kill = os.environ.get(KILL_ENV, "")
    if kill == key[2] and n == 1 or kill == key[2] + "*":
        os._exit(1)
    result = execute(task)
    result["retried"] = n - 1
    return result
