"""Webhook intake: deliveries that arrive while earlier ones are being written wait for the
next transaction and share it, so the database sees one batch instead of one transaction
per request. A lone delivery is not held back: it goes as soon as a writer is free."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from domain.runs.enqueue import Enqueued
from domain.webhooks.batches import Delivery, Outcome


class _Waiting:
    __slots__ = ("delivery", "done", "outcome")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.done = anyio.Event()
        self.outcome: Outcome | BaseException | None = None


class WebhookIntake:
    """`accept(batch)` (blocking; run in a worker thread) answers each delivery of a batch.

    `writers` batches may be in flight at once (overlapping one's database round trips with
    the next one's checks); each takes up to `max_batch` of the deliveries waiting. `run()`
    serves until cancelled and belongs in the app's lifespan.
    """

    def __init__(
        self,
        accept: Callable[[Sequence[Delivery]], list[Outcome]],
        *,
        max_batch: int = 100,
        writers: int = 2,
    ) -> None:
        self.accept = accept
        self.max_batch = max_batch
        self.writers = writers
        self._send: MemoryObjectSendStream[_Waiting] | None = None
        self._writing = 0  # batches being written
        self._nudge = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started()` once deliveries are accepted, so a
        lifespan that starts it with `TaskGroup.start` serves no request before that."""
        send, receive = anyio.create_memory_object_stream[_Waiting](math.inf)
        self._send = send
        try:
            async with send, receive, anyio.create_task_group() as tasks:
                for _ in range(self.writers):
                    tasks.start_soon(self._write, receive.clone())
                task_status.started()
        finally:
            self._send = None

    async def submit(self, delivery: Delivery) -> Enqueued:
        """The delivery's run once its transaction has committed; raises why it was refused."""
        if self._send is None:
            raise RuntimeError("the webhook intake is not running (the app's lifespan runs it)")
        waiting = _Waiting(delivery)
        self._send.send_nowait(waiting)
        self._poke()
        # A caller that goes away (client disconnect) leaves the delivery to be written.
        await waiting.done.wait()
        if isinstance(waiting.outcome, BaseException):
            raise waiting.outcome
        assert waiting.outcome is not None
        return waiting.outcome

    def _poke(self) -> None:
        """Wake a writer waiting for company: a delivery arrived, or a batch ended."""
        self._nudge.set()
        self._nudge = anyio.Event()

    async def _write(self, receive: MemoryObjectReceiveStream[_Waiting]) -> None:
        async with receive:
            async for first in receive:
                batch = self._gather(receive, [first])
                # Alone while another batch is being written: wait for a companion or for that
                # batch to end, rather than spend a whole transaction on one delivery.
                while len(batch) == 1 and self._writing:
                    await self._nudge.wait()
                    batch = self._gather(receive, batch)
                deliveries = [w.delivery for w in batch]
                self._writing += 1
                outcomes: Sequence[Outcome | BaseException]
                try:
                    outcomes = await anyio.to_thread.run_sync(self.accept, deliveries)
                except Exception as exc:  # a bug, not a refusal: each caller answers 500
                    outcomes = [exc] * len(batch)
                finally:
                    self._writing -= 1
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    waiting.outcome = outcome
                    waiting.done.set()
                self._poke()

    def _gather(
        self, receive: MemoryObjectReceiveStream[_Waiting], batch: list[_Waiting]
    ) -> list[_Waiting]:
        """`batch` and what is waiting now, up to max_batch."""
        while len(batch) < self.max_batch:
            try:
                batch.append(receive.receive_nowait())
            except anyio.WouldBlock:
                break
        return batch
