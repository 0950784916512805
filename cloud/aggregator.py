"""Where the front worker's arithmetic runs: the seam between the session protocol
(:class:`cloud.worker.CloudSession`) and the code that folds a session's batches.

A session hands its aggregator each complete batch (one checked ciphertext per lane) and
later asks for the named accumulators, serialized. :class:`InProcessAggregator` folds in the
worker's own process, as the worker always has (the default). ``cloud.dask_aggregator``
spreads the batches over a Dask cluster and folds the partial sums it returns.

:func:`fold_batch` is the arithmetic itself (slot-wise sums of lanes and of lane products,
as :func:`pacegate.analytics_wire.accumulator_plan` says): both aggregators and the Dask
tasks call it, so there is one copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import tenseal as ts

from pacegate.analytics_wire import Accumulator, AnalyticsProtocolError


@dataclass(frozen=True, slots=True)
class Lane:
    """One received ciphertext: its bytes (digest checked by the wire format) and the vector
    :func:`pacegate.ckks.load_ciphertext` made of them under the session's public context."""

    data: bytes
    vector: ts.CKKSVector


class Aggregator(Protocol):
    """Folds one session's batches; made per session by an :class:`AggregatorFactory`."""

    def add_batch(self, batch: Sequence[Lane]) -> None:
        """Fold one complete batch (``lanes(bands)`` lanes, lane order)."""

    def result(self, name: str) -> bytes:
        """The named accumulator over every batch added so far, serialized. Raises
        :class:`AnalyticsProtocolError` when it cannot be computed."""

    def close(self) -> None:
        """Drop every ciphertext held (the session ended or failed)."""


class AggregatorFactory(Protocol):
    def __call__(
        self, *, context: ts.Context, context_bytes: bytes, plan: tuple[Accumulator, ...]
    ) -> Aggregator:
        """An aggregator for one session: ``context`` is the session's checked public
        context, ``context_bytes`` what the hospital sent of it."""


def serialized_accumulator(acc: dict[str, ts.CKKSVector], name: str) -> bytes:
    """The running sum ``name`` of ``acc``, serialized (an aggregator's ``result``)."""
    vector = acc.get(name)
    if vector is None:
        raise AnalyticsProtocolError(f"no accumulator named {name!r}", reason="unknown_accumulator")
    data: bytes = vector.serialize()
    return data


def fold_batch(
    acc: dict[str, ts.CKKSVector], plan: Sequence[Accumulator], batch: Sequence[ts.CKKSVector]
) -> None:
    """Add one batch into ``acc`` (name -> running sum), in place.

    The batch's vectors become ``acc``'s own (the first batch's lanes *are* the linear
    sums from then on): callers hand over vectors they no longer use. A TenSEAL
    ``copy()`` costs ~13 ms (about 100 additions): once per linear sum per Dask task, it
    was most of a task's time."""
    for spec in plan:
        term = batch[spec.lane]
        if spec.other is not None:
            term = term * batch[spec.other]  # size 3, scale 2**80: no relin, no rescale
        current = acc.get(spec.name)
        if current is None:
            # A lane already held as another sum would be changed by that sum's add_.
            aliased = any(held is term for held in acc.values())
            acc[spec.name] = term.copy() if aliased else term
        else:
            current.add_(term)


def add_partials(acc: dict[str, ts.CKKSVector], partial: Mapping[str, ts.CKKSVector]) -> None:
    """Add partial sums (over disjoint sets of batches) into ``acc``, in place."""
    for name, vec in partial.items():
        current = acc.get(name)
        if current is None:
            acc[name] = vec
        else:
            current.add_(vec)


class InProcessAggregator:
    """Folds each batch as it completes, in this process (the worker's default)."""

    def __init__(
        self, *, context: ts.Context, context_bytes: bytes, plan: tuple[Accumulator, ...]
    ) -> None:
        del context, context_bytes  # the lanes arrive already loaded under it
        self._plan = plan
        self._acc: dict[str, ts.CKKSVector] = {}

    def add_batch(self, batch: Sequence[Lane]) -> None:
        fold_batch(self._acc, self._plan, [lane.vector for lane in batch])

    def result(self, name: str) -> bytes:
        return serialized_accumulator(self._acc, name)

    def close(self) -> None:
        self._acc.clear()
