"""Batches made ahead of the step that needs them, on background threads.

    with Prefetcher(make_batch, range(start, total), threads=2, depth=4) as batches:
        for batch in batches:        # batch k is make_batch(keys[k]), in order
            ...                      # the next `depth` batches are being made meanwhile
        batches.waited               # seconds the consumer spent blocked, waiting for a batch

A batch is a pure function of its key (the run's seed and the step), so the threads change when a
batch is made, never what it holds: exact resume and the equality of N processes with one hold.
Threads, not processes: gathering rows of a memory-mapped array, cropping and resizing are torch and
PIL calls that release the GIL, and a thread shares the mapped data without copying it. When the step
itself runs on the CPU, each loader thread runs its torch calls on one intra-op thread
(`intra_op_threads=1`): a second team of OpenMP threads competes with the step's for its cores (the
CIFAR-10 speedrun on 2 cores trained at 305 images/s at 32x32 before, about 340 after: docs/data.md).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch

K = TypeVar("K")
B = TypeVar("B")


class Prefetcher(Generic[K, B]):
    """Iterates make(key) for each key in order, with up to `depth` batches made ahead by `threads`
    threads; `depth` 0 makes each batch on the calling thread when it is asked for. `intra_op_threads`
    (unset: torch's default) is the number of threads each loader thread's torch calls use."""

    def __init__(self, make: Callable[[K], B], keys: Iterable[K], threads: int = 1, depth: int = 2,
                 intra_op_threads: int | None = None):
        self.make, self.keys, self.depth = make, iter(keys), max(int(depth), 0)
        threads = max(int(threads), 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pixformer-batch") if self.depth else None
        if self.pool is not None and intra_op_threads:
            _limit_intra_op(self.pool, threads, intra_op_threads)
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


def _limit_intra_op(pool: ThreadPoolExecutor, threads: int, n: int) -> None:
    """Start all `threads` of `pool` now, each using `n` intra-op threads, then give the process its
    default back: torch.set_num_threads sets the calling thread's count and the one threads started
    later begin with, so the caller's own count and later threads' stay as they were."""
    keep = torch.get_num_threads()
    started = threading.Barrier(threads + 1)      # every task waits here: one pool thread each

    def limit() -> None:
        torch.get_num_threads()       # torch sets a thread's count up on its first use: before ours, not after
        with _SETTING:
            torch.set_num_threads(n)
        started.wait()

    tasks = [pool.submit(limit) for _ in range(threads)]
    started.wait()
    for t in tasks:
        t.result()
    with _SETTING:
        torch.set_num_threads(keep)


_SETTING = threading.Lock()   # torch.set_num_threads also resizes torch's shared thread pools: one call at a time


_END = object()
