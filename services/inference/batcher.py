"""Triton's dynamic batcher, on asyncio: requests queue per model version, are merged into batches, computed
in a thread pool, and split back so that each caller gets exactly its own rows of its own requested outputs.

Triton's knobs and meanings (config.pbtxt `dynamic_batching`):
- `max_batch_size`: the most rows in one batch; 0 means the model does not batch (one request per run).
- `preferred_batch_size`: a batch reaching the largest preferred size runs at once; when the delay runs out,
  the largest prefix of the queue that forms a preferred size runs, else everything that fits.
- `max_queue_delay_microseconds`: how long a batch may wait to grow, measured from the arrival of the oldest
  queued request (not from when the batcher started waiting: the bug MLServer had). It is not waited when no one
  else can join: when every caller seen lately is already queued or computing (one client alone, or all of a
  closed loop's callers back), the batch runs at once; see `_Concurrency`. The config parameter
  `cxr.hold_lone_requests: "true"` keeps Triton's exact behaviour (every batch may wait the whole delay).
- `default_queue_policy.max_queue_size`: a request arriving at a full queue is refused at once (RESOURCE_EXHAUSTED).
- `default_queue_policy.default_timeout_microseconds` / `allow_timeout_override`: a request still queued when its
  timeout (or its gRPC deadline) passes is dropped before compute and answered DEADLINE_EXCEEDED.
A cancelled request leaves the queue at once; if it is already computing, its rows are computed and discarded.
Only as many batches run at once as there are model instances, so requests gather while the instances are busy.
With several instances a batch takes at most its instance's share of the rows in flight (queued or computing,
divided by the instances): a free instance does not take the whole queue while the others finish small batches,
so batches stay even and latency has one mode instead of two.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np

from services.common.errors import ServiceError, exhausted, unavailable

# (inputs, output names) -> {output name: array with the batch's rows}; runs in a worker thread
RunBatch = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]

QUEUED, RUNNING, DONE = "queued", "running", "done"


@dataclass
class BatchResult:
    """One request's answer: its own rows of its requested outputs, its time in the queue, and the rows of the batch
    it ran in (the batch's compute time goes to `on_batch`)."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    batch_rows: int


@dataclass(eq=False)
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: frozenset[str]
    arrival: float
    expires: float | None
    future: asyncio.Future
    state: str = QUEUED


class _Concurrency:
    """The most requests in flight (queued or computing) seen lately, to tell when waiting cannot grow a batch.

    "Lately" is one or two windows of at least a second, and of four batch computations for slow models, so a
    slow model's callers, all back only after their long batch, are still counted when they return one by one.
    """

    def __init__(self, window_s: float = 1.0):
        self._min_window = window_s
        self._window = window_s
        self._started = 0.0
        self._current = 0  # the peak in this window
        self._previous = 0  # the peak in the window before

    def seen(self, in_flight: int, now: float) -> None:
        if now - self._started >= self._window:
            self._previous = self._current if now - self._started < 2 * self._window else 0
            self._current, self._started = 0, now
        self._current = max(self._current, in_flight)

    def computed(self, seconds: float) -> None:
        self._window = max(self._min_window, 4 * seconds)

    @property
    def peak(self) -> int:
        return max(self._current, self._previous)


@dataclass
class BatcherSettings:
    """The `dynamic_batching` settings of one model (microseconds as in config.pbtxt)."""

    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    instances: int = 1
    hold_lone_requests: bool = False  # wait the delay even when no other caller can join (Triton's behaviour)


class DynamicBatcher:
    """Queue, merge, compute and split requests for one model version."""

    def __init__(
        self,
        run_batch: RunBatch,
        settings: BatcherSettings,
        *,
        executor: Executor | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        clock: Callable[[], float] = time.monotonic,
    ):
        self._run_batch = run_batch
        self.settings = settings
        self._executor = executor
        self._on_batch = on_batch
        self._name = name
        self._clock = clock
        self._queue: deque[_Request] = deque()
        self._changed = asyncio.Event()  # something arrived or left the queue
        self._free = asyncio.Semaphore(max(1, settings.instances))
        self._running: set[asyncio.Task] = set()
        self._running_requests = 0
        self._running_rows = 0
        self._closed = False
        self._scheduler: asyncio.Task | None = None
        self._concurrency = _Concurrency()

    # ---- the caller's side -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests queued or computing."""
        return len(self._queue) + self._running_requests

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self._name}")

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        outputs: Iterable[str],
        *,
        deadline: float | None = None,
        timeout_us: int = 0,
    ) -> BatchResult:
        """Queue one request and wait for its rows. `deadline` is on this batcher's clock (the gRPC deadline);
        `timeout_us` is the request's own `timeout` parameter (honoured when the queue policy allows overrides)."""
        if self._closed:
            raise unavailable(f"model {self._name} is unloading; retry to reach the version now served")
        s = self.settings
        if s.max_queue_size and len(self._queue) >= s.max_queue_size:
            raise exhausted(
                f"model {self._name}: queue is full ({s.max_queue_size} requests waiting, max_queue_size); retry later",
                "queue_full",
            )
        if self._scheduler is None:
            self.start()
        now = self._clock()
        timeout_us_used = s.default_timeout_us
        if s.allow_timeout_override and timeout_us > 0:
            timeout_us_used = min(timeout_us, timeout_us_used) if timeout_us_used else timeout_us
        expires = deadline
        if timeout_us_used:
            expires = min(expires, now + timeout_us_used / 1e6) if expires is not None else now + timeout_us_used / 1e6
        loop = asyncio.get_running_loop()
        request = _Request(inputs, rows, frozenset(outputs), now, expires, loop.create_future())
        self._queue.append(request)
        self._concurrency.seen(self.pending, now)
        self._changed.set()
        # A timer, not wait_for: when it fires while the request is still queued, the request is answered
        # DEADLINE_EXCEEDED and never computed; once computing, it runs to the end.
        timer = loop.call_later(max(0.0, expires - now), self._expire, request) if expires is not None else None
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away: leave the queue so it costs nothing; if computing, its rows are discarded.
            if request.state == QUEUED:
                self._remove(request)
                request.state = DONE
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let queued and running ones finish (up to `timeout` s), then stop the scheduler."""
        self._closed = True
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self.pending and (end is None or loop.time() < end):
            await asyncio.sleep(0.01)
        if self._scheduler is not None:
            self._scheduler.cancel()
            try:
                await self._scheduler
            except asyncio.CancelledError:
                pass
        for request in list(self._queue):  # only left after a timeout: answer them rather than lose them
            self._fail(request, unavailable(f"model {self._name} was unloaded before this request ran"))
        self._queue.clear()

    # ---- the scheduler's side ----------------------------------------------------------------------------------

    def _remove(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            return
        self._changed.set()

    def _fail(self, request: _Request, error: Exception) -> None:
        request.state = DONE
        if not request.future.done():
            request.future.set_exception(error)

    def _expire(self, request: _Request) -> None:
        if request.state != QUEUED:
            return
        self._remove(request)
        waited_ms = (self._clock() - request.arrival) * 1e3
        self._fail(
            request,
            ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"model {self._name}: request timed out after {waited_ms:.0f} ms in the queue and was not computed",
                "timeout",
            ),
        )

    def _drop_expired(self) -> None:
        now = self._clock()
        for request in [r for r in self._queue if r.expires is not None and r.expires <= now]:
            self._expire(request)

    async def _schedule(self) -> None:
        while True:
            await self._free.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free.release()
                raise
            for request in batch:
                request.state = RUNNING
            self._running_requests += len(batch)
            self._running_rows += sum(r.rows for r in batch)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _batch_limit(self) -> int:
        """The most rows the next batch may take: max_batch_size, or less, this instance's share of the rows in
        flight when there are several instances."""
        s = self.settings
        if s.instances <= 1:
            return s.max_batch_size
        in_flight = self._running_rows + sum(r.rows for r in self._queue)
        return max(1, min(s.max_batch_size, -(-in_flight // s.instances)))

    def _fitting_prefix(self) -> tuple[list[int], bool]:
        """Cumulative row counts of the queue's FIFO prefix that fits in one batch, and whether the prefix was
        cut short by a request that does not fit (so waiting cannot grow the batch)."""
        limit = self._batch_limit()
        sums, total = [], 0
        for request in self._queue:
            if total + request.rows > limit:
                return sums, True
            total += request.rows
            sums.append(total)
        return sums, False

    async def _next_batch(self) -> list[_Request]:
        s = self.settings
        while True:
            self._drop_expired()
            if not self._queue:
                self._changed.clear()
                await self._changed.wait()
                continue
            if s.max_batch_size <= 0:  # the model does not batch: one request per run
                return [self._queue.popleft()]
            sums, blocked = self._fitting_prefix()
            if not sums:  # a request larger than the instance's share runs alone; never stall the queue on it
                return self._take(1)
            target = max(s.preferred_batch_sizes) if s.preferred_batch_sizes else s.max_batch_size
            now = self._clock()
            waited_enough = now >= self._queue[0].arrival + s.max_queue_delay_us / 1e6
            if target in sums:  # the largest preferred size (or a full batch) is there: run it now
                return self._take(sums.index(target) + 1)
            # Waiting cannot grow the batch when every caller seen lately is already here (queued or computing).
            nobody_else = not s.hold_lone_requests and self.pending >= self._concurrency.peak
            if blocked or sums[-1] >= s.max_batch_size or waited_enough or nobody_else:
                preferred = [i for i, rows in enumerate(sums) if rows in s.preferred_batch_sizes]
                return self._take(preferred[-1] + 1 if preferred else len(sums))
            # Wait for more requests, but no longer than the oldest request's arrival + delay.
            self._changed.clear()
            wake = self._queue[0].arrival + s.max_queue_delay_us / 1e6
            expiries = [r.expires for r in self._queue if r.expires is not None]
            if expiries:
                wake = min(wake, min(expiries))
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))
            except TimeoutError:
                pass

    def _take(self, count: int) -> list[_Request]:
        return [self._queue.popleft() for _ in range(count)]

    async def _execute(self, batch: list[_Request]) -> None:
        start = self._clock()
        rows = sum(r.rows for r in batch)
        try:
            names = sorted(set().union(*(r.outputs for r in batch)))
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {k: np.concatenate([r.inputs[k] for r in batch], axis=0) for k in batch[0].inputs}
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._run_batch, feeds, names)
            compute_s = self._clock() - start
            self._concurrency.computed(compute_s)
            if self.settings.max_batch_size > 0:
                for n in names:
                    if results[n].shape[0] != rows:
                        raise RuntimeError(f"output {n} has {results[n].shape[0]} rows for a batch of {rows}")
            if self._on_batch is not None:
                self._on_batch(rows, compute_s)
            offset = 0
            for request in batch:
                if self.settings.max_batch_size > 0:
                    mine = {n: results[n][offset : offset + request.rows] for n in request.outputs}
                else:
                    mine = {n: results[n] for n in request.outputs}
                offset += request.rows
                request.state = DONE
                if not request.future.done():
                    request.future.set_result(BatchResult(mine, start - request.arrival, rows))
        except Exception as e:  # noqa: BLE001 - every request of a failed batch gets an answer
            error = ServiceError(grpc.StatusCode.INTERNAL, f"model {self._name}: execution failed: {e}", "compute")
            for request in batch:
                self._fail(request, error)
        finally:
            self._running_requests -= len(batch)
            self._running_rows -= rows
            self._free.release()
