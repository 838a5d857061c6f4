"""Dynamic batching: concurrent requests become one call (the server's CLIP endpoints).

A worker thread takes the first waiting request together with every request already waiting
behind it (up to ``max_batch``), runs ``run_batch`` once on them and hands each result (or the
batch's exception) back to the request's future. There is no window by default (``wait_ms``
0), as for chat: a lone request runs at once, and under load the requests that arrive while a
batch runs form the next one — the batch size follows the load. (A window of 10 ms, the first
design, made a lone zero-shot request take 25 ms instead of 11 and left the tower idle while it
waited; ``wait_ms`` > 0 still collects for that long.) The queue is
bounded: :meth:`Batcher.submit` raises :class:`QueueFull` instead of letting it grow, and
the server answers 503 with Retry-After. With ``max_batch=1`` the same server handles one
request at a time — the baseline of the load test.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from medvl.generate.continuous import QueueFull  # one exception for every bounded queue of the server

__all__ = ["Batcher", "QueueFull"]


class Batcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 32,
                 wait_ms: float = 0.0, max_queue: int = 64):
        self.run_batch = run_batch
        self.max_batch = max(1, max_batch)
        self.wait = wait_ms / 1000.0
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batches = 0
        self.items = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="medvl-batcher", daemon=True)
        self.thread.start()

    def submit(self, item: Any) -> Future:
        fut: Future = Future()
        try:
            self.q.put_nowait((item, fut))
        except queue.Full:
            raise QueueFull from None
        return fut

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            live = [(it, f) for it, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self.run_batch([it for it, _ in live])
                for (_, f), r in zip(live, results):
                    f.set_result(r)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, f in live:
                    f.set_exception(e)
            self.batches += 1
            self.items += len(live)
