"""The front worker's Dask backend: a session's batches folded on a Dask cluster.

The hospital still speaks only the post-quantum channel, to the front worker
(:mod:`cloud.worker`), which checks every ciphertext as before. Complete batches are then
grouped into tasks of :attr:`DaskSettings.batches_per_task` batches and submitted to the
cluster. A task gets **bytes only** (TenSEAL objects do not pickle): the public context
as the hospital sent it, and the serialized lanes. It loads the context with
:func:`pacegate.ckks.load_public_context` (which refuses one holding a secret key), loads
and checks each lane, folds the batches with :func:`cloud.aggregator.fold_batch` (the
in-process arithmetic) and returns the partial sums serialized. The front worker loads
each partial with the accumulator's expected degree (so a bad reply from a worker is
refused, not added) and adds them up.

**Retries cannot double count.** A task is a pure function of its arguments, and the
front worker folds each task's result exactly once, when it collects that task's future.
When a worker dies mid-task, the scheduler re-runs the task on another worker (up to
``distributed.scheduler.allowed-failures`` times, then ``KilledWorker``); the re-run's
result *replaces* the lost one, it is never added beside it. The arguments travel inside
the task (not scattered to one worker), so the scheduler can always re-run it.

**TLS only, with a cluster CA.** :func:`cluster_security` asks for TLS 1.3, mutual
certificates and ``require_encryption`` (a ``tcp://`` address is refused). Dask admits
any certificate its CA signed and checks no host name, and a cluster member can make the
others run code (Dask's messages are pickles), so the CA is the cluster's own
(:func:`pacegate.pki.issue_cluster_identities`), never the device CA.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts
from distributed import Client, Future
from distributed.security import Security

from cloud.aggregator import Lane, add_partials, fold_batch, serialized_accumulator
from cloud.config import (
    DEFAULT_BATCHES_PER_TASK,
    DEFAULT_MAX_TASKS_IN_FLIGHT,
    DEFAULT_TASK_TIMEOUT_S,
)
from pacegate import ckks
from pacegate.analytics_wire import Accumulator, AnalyticsProtocolError
from pacegate.errors import ConfigError

log = logging.getLogger("pacegate.cloud.dask")

# ... and whatever the band count, a task's lanes stay under 9 MB: Dask warns ("Sending
# large graph") at 10 MB (distributed.admin.large-graph-warning-threshold) and a big task
# is a big loss when its worker dies.
MAX_TASK_BYTES = 9_000_000
# Connecting to the scheduler: it may still be starting when the front worker does.
DEFAULT_CONNECT_TIMEOUT_S = 30.0
# Parsed public contexts a Dask worker keeps (by digest): one per live session is enough.
_WORKER_CONTEXT_CACHE = 4


@dataclass(frozen=True)
class DaskSettings:
    """Where the cluster is and who the front worker is on it (cloud.yaml's ``aggregator``)."""

    scheduler: str  # tls://host:port
    ca_file: Path  # the cluster CA (not the device CA)
    cert: Path  # the front worker's cluster certificate (clientAuth)
    key: Path  # its key, 0600
    batches_per_task: int = DEFAULT_BATCHES_PER_TASK
    max_tasks_in_flight: int = DEFAULT_MAX_TASKS_IN_FLIGHT
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.scheduler.startswith("tls://"):
            raise ValueError(
                f"aggregator.scheduler {self.scheduler!r}: must be a tls:// address "
                "(the cluster speaks TLS only)"
            )
        if self.batches_per_task < 1 or self.max_tasks_in_flight < 1:
            raise ValueError("batches_per_task and max_tasks_in_flight must be at least 1")


def cluster_security(ca_file: Path, cert: Path, key: Path, *, role: str = "client") -> Security:
    """Dask's TLS settings for one cluster member: mutual TLS 1.3 under the cluster CA,
    encryption required. ``role``: client, scheduler or worker."""
    if role not in ("client", "scheduler", "worker"):
        raise ValueError(f"role must be client, scheduler or worker, not {role!r}")
    for name, what, path in (
        ("ca_file", "CA", ca_file),
        ("cert", "certificate", cert),
        ("key", "key", key),
    ):
        if not Path(path).is_file():
            raise ConfigError(
                path,
                f"aggregator.{name}",
                f"the cluster {what} file is missing",
                fix="issue the cluster identities with console.dask_cluster "
                "(pacegate.pki.issue_cluster_identities) and name them here",
            )
    return Security(  # type: ignore[no-untyped-call]
        require_encryption=True,
        tls_min_version=ssl.TLSVersion.TLSv1_3,
        tls_ca_file=str(ca_file),
        **{f"tls_{role}_cert": str(cert), f"tls_{role}_key": str(key)},
    )


# --- what runs on a Dask worker -------------------------------------------------------

_contexts: OrderedDict[bytes, ts.Context] = OrderedDict()


def _worker_context(context_bytes: bytes) -> ts.Context:
    """The public context for these bytes, parsed once per worker process."""
    digest = hashlib.sha256(context_bytes).digest()
    ctx = _contexts.get(digest)
    if ctx is None:
        ctx = ckks.load_public_context(context_bytes)  # refuses a secret key
        _contexts[digest] = ctx
        while len(_contexts) > _WORKER_CONTEXT_CACHE:
            _contexts.popitem(last=False)
    else:
        _contexts.move_to_end(digest)
    return ctx


@dataclass(frozen=True)
class ChunkRefused:
    """A task's input was refused (returned, not raised: a refusal is not worth a retry)."""

    reason: str
    detail: str


def aggregate_chunk(
    context_bytes: bytes, plan: tuple[Accumulator, ...], batches: list[list[bytes]]
) -> dict[str, bytes] | ChunkRefused:
    """The partial sums of ``batches`` (a Dask task: bytes in, bytes out, no state kept
    but the parsed public context)."""
    try:
        ctx = _worker_context(context_bytes)
        acc: dict[str, ts.CKKSVector] = {}
        for batch in batches:
            fold_batch(acc, plan, [ckks.load_ciphertext(ctx, data) for data in batch])
    except AnalyticsProtocolError as exc:
        return ChunkRefused(exc.reason, str(exc))
    return {name: vec.serialize() for name, vec in acc.items()}


def held_contexts() -> list[dict[str, bool]]:
    """What this worker process holds (run on each worker by ``Client.run``): for every
    context it parsed, whether it is private or has a secret key."""
    return [
        {"is_private": bool(ctx.is_private()), "has_secret_key": bool(ctx.has_secret_key())}
        for ctx in _contexts.values()
    ]


# --- the front worker's side ----------------------------------------------------------


@dataclass
class DaskStats:
    """Counters of one front worker's Dask backend, over all its sessions."""

    tasks_submitted: int = 0
    tasks_folded: int = 0


class DaskBackend:
    """One Dask client per front worker process; call it to get a session's aggregator
    (it is an :class:`cloud.aggregator.AggregatorFactory`)."""

    def __init__(self, settings: DaskSettings) -> None:
        self.settings = settings
        self.stats = DaskStats()
        security = cluster_security(settings.ca_file, settings.cert, settings.key)
        try:
            self.client = Client(  # type: ignore[no-untyped-call]
                settings.scheduler,
                security=security,
                timeout=settings.connect_timeout_s,
                set_as_default=False,
            )
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                None,
                "aggregator.scheduler",
                f"cannot reach the Dask scheduler at {settings.scheduler} within "
                f"{settings.connect_timeout_s:.0f} s ({type(exc).__name__}: {exc})",
                fix="start the cluster (python -m console.dask_cluster --dir D) and name "
                "its tls:// address, the cluster CA and a certificate that CA issued",
            ) from None
        log.info("connected to the Dask scheduler", extra={"fields": {"at": settings.scheduler}})

    def __call__(
        self, *, context: ts.Context, context_bytes: bytes, plan: tuple[Accumulator, ...]
    ) -> DaskAggregator:
        return DaskAggregator(
            self.client,
            self.settings,
            context=context,
            context_bytes=context_bytes,
            plan=plan,
            stats=self.stats,
        )

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]


class DaskAggregator:
    """One session's batches, spread over the cluster in tasks, partial sums folded here."""

    def __init__(
        self,
        client: Client,
        settings: DaskSettings,
        *,
        context: ts.Context,
        context_bytes: bytes,
        plan: tuple[Accumulator, ...],
        stats: DaskStats | None = None,
    ) -> None:
        self._client = client
        self.stats = stats if stats is not None else DaskStats()
        self._settings = settings
        self._context = context
        self._context_bytes = context_bytes
        self._plan = plan
        self._degree = {spec.name: spec.degree for spec in plan}
        self._chunk: list[list[bytes]] = []
        self._chunk_bytes = 0
        self._in_flight: deque[Future[Any]] = deque()
        self._acc: dict[str, ts.CKKSVector] = {}

    def add_batch(self, batch: Sequence[Lane]) -> None:
        size = sum(len(lane.data) for lane in batch)
        if self._chunk and self._chunk_bytes + size > MAX_TASK_BYTES:
            self._submit()
        self._chunk.append([lane.data for lane in batch])
        self._chunk_bytes += size
        if len(self._chunk) >= self._settings.batches_per_task:
            self._submit()
        while len(self._in_flight) > self._settings.max_tasks_in_flight:
            self._fold_oldest()

    def result(self, name: str) -> bytes:
        self._submit()
        while self._in_flight:
            self._fold_oldest()
        return serialized_accumulator(self._acc, name)

    def close(self) -> None:
        for future in self._in_flight:
            future.cancel()  # type: ignore[no-untyped-call]
        self._in_flight.clear()
        self._chunk.clear()
        self._chunk_bytes = 0
        self._acc.clear()

    def _submit(self) -> None:
        if not self._chunk:
            return
        # pure=False: two equal chunks (a re-sent batch pattern) are two tasks, two sums
        future = self._client.submit(
            aggregate_chunk, self._context_bytes, self._plan, self._chunk, pure=False
        )
        self._in_flight.append(future)
        self._chunk = []
        self._chunk_bytes = 0
        self.stats.tasks_submitted += 1

    def _fold_oldest(self) -> None:
        future = self._in_flight.popleft()
        try:
            partial: Any = future.result(timeout=self._settings.task_timeout_s)
        except (FutureTimeout, TimeoutError):
            self.close()
            raise AnalyticsProtocolError(
                f"the Dask cluster did not finish a task in {self._settings.task_timeout_s:.0f} s",
                reason="cluster_timeout",
            ) from None
        except Exception as exc:  # KilledWorker, a lost scheduler, a cancelled future
            self.close()
            raise AnalyticsProtocolError(
                f"the Dask cluster failed a task: {type(exc).__name__}: {exc}",
                reason="cluster_failed",
            ) from None
        if isinstance(partial, ChunkRefused):
            self.close()
            raise AnalyticsProtocolError(
                f"a Dask worker refused a batch: {partial.detail}", reason=partial.reason
            )
        if not isinstance(partial, dict) or set(partial) != set(self._degree):
            self.close()
            raise AnalyticsProtocolError(
                "a Dask worker returned something other than this session's accumulators",
                reason="bad_worker_result",
            )
        loaded = {
            name: ckks.load_ciphertext(self._context, data, degree=self._degree[name])
            for name, data in partial.items()
        }
        add_partials(self._acc, loaded)
        self.stats.tasks_folded += 1
