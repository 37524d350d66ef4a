"""Concurrent requests share forward passes: a bounded queue and one worker thread that decodes what is waiting
together (dynamic batching).

    batcher = Batcher(model, tokenizer, device=..., autocast=..., max_batch=8, queue_size=64)
    job = Job(row, loop=asyncio.get_running_loop())
    batcher.submit(job)                    # QueueFull when `queue_size` requests already wait: the caller says 429
    async for token, logprob, finished in job.tokens(): ...

The worker takes the first waiting request, waits up to `wait_ms` for more, and decodes up to `max_batch` of them
in one left-padded batch (`core.generation.decode`); each token goes back to its request's asyncio queue as soon
as the forward pass that made it ends, so streams flow while the batch runs. A request whose client is gone, or
whose stop text appeared, is `cancel`led: its row ends at the next pass. Prompt scoring (echo + logprobs) runs in
the same thread, one request at a time, so the model is only ever used by one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

from llmctl.core.generation import Row, decode, prompt_logprobs

_STOP = object()


class QueueFull(Exception):
    """Every place in the queue is taken: the request should be retried later."""


@dataclass
class Job:
    """One request: a row to decode (or, with `score`, a prompt to score), and where its results go."""

    row: Row
    loop: asyncio.AbstractEventLoop
    score: int | None = None  # echo + logprobs: score the prompt, with this many alternatives per token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def _send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        """End this request's row at the next forward pass (its client left, or its stop text appeared)."""
        self.cancelled = True
        self.row.max_new_tokens = 0

    async def tokens(self):
        """(token id, logprob, finished) as they are made; the worker's exception, if it failed, is raised here."""
        while True:
            item = await self.events.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def scores(self):
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Batcher:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        device,
        autocast,
        pad: int,
        max_batch: int = 8,
        queue_size: int = 64,
        wait_ms: float = 5.0,
    ):
        self.model, self.tokenizer, self.device, self.autocast, self.pad = model, tokenizer, device, autocast, pad
        self.max_batch, self.wait = int(max_batch), float(wait_ms) / 1000
        self.pending: queue.Queue = queue.Queue(maxsize=int(queue_size))
        self.batches = 0  # batches decoded, and the largest (tests and logs read them)
        self.largest = 0
        self._thread = threading.Thread(target=self._work, name="llmctl-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def waiting(self) -> int:
        return self.pending.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the worker."""
        with contextlib.suppress(queue.Full):
            self.pending.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    # ---- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self.pending.get()
            if first is _STOP:
                return
            jobs, deadline = [first], time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.pending.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self.pending.put(_STOP)  # stop after this batch
                    break
                jobs.append(nxt)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        scoring, generating = [j for j in jobs if j.score is not None], [j for j in jobs if j.score is None]
        for job in scoring:
            try:
                with self.autocast():
                    job._send(prompt_logprobs(self.model, job.row.ids, top=job.score, device=self.device))
            except Exception as e:  # the request answers 500; the server goes on
                job._send(e)
        live = [j for j in generating if not j.cancelled]
        for job in generating:
            if job.cancelled:
                job._send(_STOP)
        if not live:
            return
        self.batches += 1
        self.largest = max(self.largest, len(live))
        ended = set()
        try:
            with self.autocast():
                for step in decode(self.model, [j.row for j in live], pad=self.pad, device=self.device):
                    for i, event in step.items():
                        live[i]._send(event)
                        if event[2]:
                            live[i]._send(_STOP)
                            ended.add(i)
        except Exception as e:
            for i, job in enumerate(live):
                if i not in ended:
                    job._send(e)
            return
        for i, job in enumerate(live):
            if i not in ended:  # no token to make (max_tokens=0), or cancelled before its first
                job._send(_STOP)
