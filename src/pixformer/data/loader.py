"""Batches made ahead of the step that needs them, on background threads.

    with Prefetcher(make_batch, range(start, total), threads=2, depth=4) as batches:
        for batch in batches:        # batch k is make_batch(keys[k]), in order
            ...                      # the next `depth` batches are being made meanwhile
        batches.waited               # seconds the consumer spent blocked, waiting for a batch

A batch is a pure function of its key (the run's seed and the step), so the threads change when a
batch is made, never what it holds: exact resume and the equality of N processes with one hold.
Threads, not processes: gathering rows of a memory-mapped array, cropping and resizing are torch and
PIL calls that release the GIL, and a thread shares the mapped data without copying it.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, TypeVar

K = TypeVar("K")
B = TypeVar("B")


class Prefetcher(Generic[K, B]):
    """Iterates make(key) for each key in order, with up to `depth` batches made ahead by `threads`
    threads; `depth` 0 makes each batch on the calling thread when it is asked for."""

    def __init__(self, make: Callable[[K], B], keys: Iterable[K], threads: int = 1, depth: int = 2):
        self.make, self.keys, self.depth = make, iter(keys), max(int(depth), 0)
        self.pool = ThreadPoolExecutor(max(int(threads), 1), thread_name_prefix="pixformer-batch") if self.depth else None
        self.ahead: deque[Future] = deque()
        self.waited = 0.0

    def _fill(self) -> None:
        while self.pool is not None and len(self.ahead) < self.depth:
            key = next(self.keys, _END)
            if key is _END:
                return
            self.ahead.append(self.pool.submit(self.make, key))

    def __iter__(self) -> Iterator[B]:
        return self

    def __next__(self) -> B:
        t0 = time.perf_counter()
        if self.pool is None:
            key = next(self.keys, _END)
            if key is _END:
                raise StopIteration
            batch = self.make(key)
        else:
            self._fill()
            if not self.ahead:
                raise StopIteration
            batch = self.ahead.popleft().result()       # an error making it is raised here, in order
            self._fill()
        self.waited += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        """Stop making batches; those in flight are abandoned."""
        if self.pool is not None:
            for f in self.ahead:
                f.cancel()
            self.ahead.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "Prefetcher[K, B]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_END = object()
