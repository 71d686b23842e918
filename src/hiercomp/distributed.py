"""Fan-out: many independent evaluations, one after another here or spread over a Ray cluster.

An :class:`Executor` maps a function over items and returns the results in the items' order. The serial one is
a plain loop in this process; :class:`RayExecutor` sends each item to one of a pool of long-lived Ray actors
(``--workers N`` starts a local cluster with N of them; ``--ray-address auto`` joins a running cluster).

What stays the same as a serial run, bit for bit:

* everything random is drawn by the caller in this process (the search's mutations and batches), so the workers
  only ever see finished requests;
* each worker computes with the same number of torch threads as this process by default (float reductions
  follow the thread count, so a different count can change the last bits of a KL);
* big read-only state (the original model, the candidate layers) goes once through Ray's object store
  (:meth:`Executor.share`) and is built into the worker's own objects once per worker process, never per item.

Ray is imported only here and only when a cluster is asked for; without it the error names the extra to install.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hiercomp.errors import HiercompError

T = TypeVar("T")
R = TypeVar("R")

CONNECT_TIMEOUT_S = 5.0  # an unreachable --ray-address fails this fast instead of Ray's minutes of retries
PIPELINE = 2  # items in flight per worker
START_TIMEOUT_S = 300.0  # workers that cannot be placed (too few CPUs or memory on the cluster) fail after this


@dataclass(frozen=True)
class ClusterConfig:
    """Where evaluations run: ``workers`` local Ray workers, or a running cluster at ``address`` (or both: that
    many workers on it). ``threads``: torch threads per worker; None = this process's count (identical floats)."""

    workers: int | None = None
    address: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise HiercompError(f"--workers must be at least 1 (got {self.workers}); leave it out to run in "
                                "this process")
        if self.threads is not None and self.threads < 1:
            raise HiercompError(f"--worker-threads must be at least 1 (got {self.threads})")
        if self.address is not None and not self.address.strip():
            raise HiercompError("--ray-address is empty; pass 'auto' or HOST:PORT of a running Ray cluster")

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.address is not None

    def preflight(self) -> None:
        """Fail now, before a model loads or candidates are built, when Ray is missing or the address is dead."""
        if self.distributed:
            _require_ray()
            if self.address is not None:
                _check_reachable(self.address)


class Shared:
    """Read-only state every worker needs, made by ``build(*args)`` once per process on first use.

    ``args`` travel once (through Ray's object store when there is a cluster); ``build`` runs in the worker, so
    what it makes (a model copy, caches) lives there and is reused by every later item on that worker."""

    _ids = itertools.count()

    def __init__(self, build: Callable[..., Any], args: Any, ray_ref: Any = None) -> None:
        self.key = f"{id(self)}-{next(Shared._ids)}"
        self.build, self._args, self._ref = build, args, ray_ref

    def __getstate__(self) -> dict[str, Any]:  # the arguments go by object-store reference, never inline
        return {"key": self.key, "build": self.build, "_args": None if self._ref is not None else self._args,
                "_ref": self._ref}

    def get(self) -> Any:
        if self._ref is None:  # in this process: kept on the object, gone with it
            if not hasattr(self, "_value"):
                self._value = self.build(*self._args)
            return self._value
        if self.key not in _WORKER_STATE:  # in a worker: every item arrives as a fresh copy, so keep it by key
            import ray

            _WORKER_STATE[self.key] = self.build(*ray.get(self._ref))
        return _WORKER_STATE[self.key]


_WORKER_STATE: dict[str, Any] = {}  # per process: Shared.key -> what its build made


class Executor:
    """Runs ``fn(item)`` for every item, here, one after another."""

    workers = 1

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(item) for item in items]

    def share(self, build: Callable[..., Any], *args: Any) -> Shared:
        return Shared(build, args)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "this process"


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HiercompError("--workers / --ray-address need Ray: pip install 'hiercomp[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on: one line now, not Ray's retries for minutes."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise HiercompError(f"--ray-address {address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise HiercompError(f"no Ray cluster answers at {address} ({err.strerror or type(err).__name__}); "
                            "start one with `ray start --head` or check the address") from None


class RayExecutor(Executor):
    """A pool of Ray actors, each one worker process computing with ``threads`` torch threads."""

    def __init__(self, config: ClusterConfig) -> None:
        ray = _require_ray()
        self._ray, self._actors, self._started = ray, [], False
        self.threads = config.threads or torch.get_num_threads()
        if not ray.is_initialized():
            if config.address is not None:
                _check_reachable(config.address)
                try:
                    ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                except (ConnectionError, RuntimeError, ValueError) as err:
                    # Ray's own reason is deep in the cause; its message is "failed to connect"
                    chain, link = [], err
                    while link is not None and len(chain) < 8:
                        chain.append(str(link))
                        link = link.__cause__ or link.__context__
                    wants_token = "authentication token" in " ".join(chain).lower()
                    reason = ("it wants its auth token (RAY_AUTH_MODE=token with ~/.ray/auth_token or RAY_AUTH_TOKEN, "
                              "as on the head node)" if wants_token else str(err).splitlines()[0])
                    raise HiercompError(f"cannot join the Ray cluster at {config.address}: {reason}") from None
            else:
                # Ray lowers its workers' priority by 15 nice levels by default; on a shared machine that hands
                # their cores to every other process, and the work that ran at this process's priority in a run
                # without workers would now wait. Keep this process's priority (RAY_worker_niceness overrides).
                os.environ.setdefault("RAY_worker_niceness", "0")
                # Logical CPUs: one worker = `threads` CPUs, so Ray places exactly `workers` actors.
                ray.init(num_cpus=config.workers * self.threads, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = config.workers or max(1, cpus // self.threads)
        if self.workers * self.threads > cpus:
            self.close()
            raise HiercompError(f"the Ray cluster has {cpus} CPUs, fewer than --workers {self.workers} x "
                                f"{self.threads} torch threads each; lower --workers or --worker-threads")
        threads = self.threads

        @ray.remote(num_cpus=threads)
        class _Worker:
            def __init__(self) -> None:
                torch.set_num_threads(threads)  # the driver's count: the same float reductions as a serial run

            def ready(self) -> bool:
                return True

            def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
                return fn(item)

        self._actors = [_Worker.remote() for _ in range(self.workers)]
        # Wait until every worker process runs: a start-up failure surfaces here, not as a hang in the first map.
        ready = [actor.ready.remote() for actor in self._actors]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=START_TIMEOUT_S)
        if len(done) < len(ready):
            self.close()
            raise HiercompError(f"Ray started {len(done)} of {self.workers} workers in {START_TIMEOUT_S:.0f} s; "
                                "the cluster lacks CPUs or memory for them: lower --workers")

    def share(self, build: Callable[..., Any], *args: Any) -> Shared:
        return Shared(build, args, self._ray.put(args))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Each actor holds up to PIPELINE items (the next one is queued on it while it computes, so it never waits
        for this process to hand it work); results come back in the items' order whichever finishes first."""
        ray = self._ray
        fn_ref = ray.put(fn)
        results: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[int, Any]] = {}
        queue = list(enumerate(items))[::-1]
        idle = [actor for _ in range(PIPELINE) for actor in self._actors]
        try:
            while queue or pending:
                while idle and queue:
                    index, item = queue.pop()
                    actor = idle.pop()
                    pending[actor.run.remote(fn_ref, item)] = (index, actor)
                done, _ = ray.wait(list(pending), num_returns=1)
                index, actor = pending.pop(done[0])
                results[index] = ray.get(done[0])
                idle.append(actor)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, HiercompError):
                raise HiercompError(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as err:  # the process is gone (killed, out of memory): no traceback
            raise HiercompError(f"a Ray worker died ({str(err).splitlines()[0][:200]}); each one holds its own "
                                "copy of the model: fewer --workers may fit in memory") from None
        return results

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def describe(self) -> str:
        return f"{self.workers} Ray workers x {self.threads} torch threads"


def make_executor(config: ClusterConfig | None) -> Executor:
    """The serial executor without a cluster config, else a Ray pool (started or joined here)."""
    if config is None or not config.distributed:
        return Executor()
    return RayExecutor(config)


@contextmanager
def executor_for(config: ClusterConfig | None) -> Iterator[Executor]:
    """An executor for the ``with`` block; a cluster started here is shut down after it."""
    executor = make_executor(config)
    try:
        yield executor
    finally:
        executor.close()
