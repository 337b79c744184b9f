"""The dynamic batcher's hard cases, on a real onnxruntime session of the toy classifier (tests/toy_model.py:
the model our training exports in miniature; no torch, no data).

The batcher is driven directly (in-process): these tests need to see exactly which rows went into which batch.
A `gate` holds the model's single instance busy where a test needs requests to pile up in the queue.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from services.common.errors import ServiceError
from services.inference.batcher import BatcherSettings, DynamicBatcher, _Concurrency
from tests import toy_model

OUTPUTS = ["probabilities", "logits", "cam"]


class RecordingModel:
    """The real session, recording the rows of every batch it runs; `gate` (when set) holds runs until opened."""

    def __init__(self, path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.batches: list[int] = []
        self.inputs_seen: list[np.ndarray] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def run(self, feeds, names):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        self.batches.append(int(feeds["image"].shape[0]))
        self.inputs_seen.append(feeds["image"].copy())
        return dict(zip(names, self.session.run(names, feeds)))

    def direct(self, images):
        return dict(zip(OUTPUTS, self.session.run(OUTPUTS, {"image": images})))


@pytest.fixture
def model(toy_onnx):
    return RecordingModel(toy_onnx)


@pytest.fixture
def images():
    """Six different images as the model takes them: uint8 [6, 1, 16, 16]."""
    return toy_model.images(6)


def make(model, **settings) -> DynamicBatcher:
    return DynamicBatcher(model.run, BatcherSettings(**{"max_batch_size": 8, **settings}), name="toy:1")


def rows(images, *indices):
    return images[list(indices)]


async def seen_callers(batcher, model, images, callers: int) -> None:
    """Let the batcher see `callers` requests in flight at once, as it would with that many clients, so that it
    waits for them (alone, a caller is never held for the delay); the model's records are then cleared."""
    await asyncio.gather(*(batcher.infer({"image": rows(images, i % 6)}, 1, ["logits"]) for i in range(callers)))
    model.batches.clear()
    model.inputs_seen.clear()


def test_timer_runs_from_the_first_requests_arrival(model, images):
    """A request arriving 0.25 s after the first joins its batch, which leaves 0.5 s after the *first* arrival
    (a timer restarted by the second arrival, MLServer's old bug, would hold the first request 0.75 s)."""

    async def scenario():
        batcher = make(model, max_queue_delay_us=500_000)
        await seen_callers(batcher, model, images, 3)
        first = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["probabilities"]))
        await asyncio.sleep(0.25)
        second = asyncio.create_task(batcher.infer({"image": rows(images, 1)}, 1, ["probabilities"]))
        a, b = await asyncio.gather(first, second)
        await batcher.close()
        return a, b

    a, b = asyncio.run(scenario())
    assert model.batches == [2], "both requests must run in one batch"
    assert a.batch_rows == b.batch_rows == 2
    assert 0.45 <= a.queue_s < 0.65, f"first request waited {a.queue_s:.3f} s; the delay is 0.5 s from its arrival"
    assert b.queue_s < a.queue_s - 0.15


def test_time_spent_waiting_for_a_busy_instance_counts_toward_the_delay(model, images):
    """A request that already waited longer than the delay while the instance was busy runs as soon as the
    instance is free; it does not start a fresh delay then."""

    async def scenario():
        batcher = make(model, max_queue_delay_us=300_000)
        model.gate = threading.Event()
        busy = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["logits"]))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
        waiting = asyncio.create_task(batcher.infer({"image": rows(images, 1)}, 1, ["logits"]))
        await asyncio.sleep(0.45)
        model.gate.set()
        result = await waiting
        await busy
        await batcher.close()
        return result

    result = asyncio.run(scenario())
    assert model.batches[-1] == 1
    assert 0.4 <= result.queue_s < 0.65, f"waited {result.queue_s:.3f} s: 0.45 s busy + a fresh 0.3 s delay is a bug"


def test_mixed_batch_sizes_are_split_back_to_the_right_callers(model, images):
    """Requests of 1, 3 and 2 rows, each asking for different outputs, run as one batch of 6; every caller
    gets exactly its own rows (equal to running its images alone) and only the outputs it asked for."""
    asks = [((0,), ["probabilities"]), ((1, 2, 3), ["cam", "logits"]), ((4, 5), ["logits"])]

    async def scenario():
        batcher = make(model, max_queue_delay_us=300_000)
        tasks = [batcher.infer({"image": rows(images, *idx)}, len(idx), outs) for idx, outs in asks]
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert model.batches == [6]
    for (idx, outs), result in zip(asks, results):
        assert sorted(result.outputs) == sorted(outs)
        alone = model.direct(rows(images, *idx))
        for name in outs:
            assert result.outputs[name].shape[0] == len(idx)
            np.testing.assert_allclose(result.outputs[name], alone[name], rtol=1e-4, atol=1e-5)
    # the rows really were different images: a split that swapped callers would be caught
    assert not np.allclose(results[0].outputs["probabilities"][0], results[2].outputs["logits"][0])


def test_requests_pile_up_while_the_instance_is_busy_and_respect_max_batch_size(model, images):
    async def scenario():
        batcher = make(model, max_batch_size=4, max_queue_delay_us=0)
        model.gate = threading.Event()
        busy = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["probabilities"]))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
        waiting = [
            asyncio.create_task(batcher.infer({"image": rows(images, i % 6)}, 1, ["probabilities"])) for i in range(6)
        ]
        await asyncio.sleep(0.1)
        model.gate.set()
        results = await asyncio.gather(busy, *waiting)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert model.batches == [1, 4, 2]
    for i, result in enumerate(results[1:]):
        alone = model.direct(rows(images, i % 6))
        np.testing.assert_allclose(result.outputs["probabilities"], alone["probabilities"], rtol=1e-4, atol=1e-5)


def test_several_instances_share_the_rows_in_flight_evenly(model, images):
    """Two instances, eight requests at once: two batches of four side by side, not one of eight and an idle
    instance; then, with four rows computing and twelve queued, the free instance takes its share (eight), not all
    twelve."""

    async def scenario():
        batcher = make(model, max_batch_size=16, instances=2)
        results = await asyncio.gather(
            *(batcher.infer({"image": rows(images, i % 6)}, 1, ["logits"]) for i in range(8))
        )
        first = sorted(model.batches)
        model.batches.clear()
        model.gate = threading.Event()
        model.started.clear()
        busy = asyncio.create_task(batcher.infer({"image": rows(images, 0, 1, 2, 3)}, 4, ["logits"]))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
        queued = [asyncio.create_task(batcher.infer({"image": rows(images, i % 6)}, 1, ["logits"])) for i in range(12)]
        await asyncio.sleep(0.2)
        model.gate.set()
        await asyncio.gather(busy, *queued)
        await batcher.close()
        return results, first

    results, first = asyncio.run(scenario())
    assert first == [4, 4]
    assert all(r.outputs["logits"].shape == (1, 3) for r in results)
    assert max(model.batches) == 8 and sum(model.batches) == 16, f"4 computing + 12 queued: {model.batches}"
    assert model.batches.count(8) == 1


def test_a_preferred_batch_size_runs_at_once_without_waiting_for_the_delay(model, images):
    async def scenario():
        batcher = make(model, preferred_batch_sizes=(3,), max_queue_delay_us=20_000_000)
        start = time.monotonic()
        results = await asyncio.gather(*(batcher.infer({"image": rows(images, i)}, 1, ["logits"]) for i in range(3)))
        elapsed = time.monotonic() - start
        await batcher.close()
        return results, elapsed

    results, elapsed = asyncio.run(scenario())
    assert model.batches == [3]
    assert elapsed < 10, "a preferred batch must not wait for the 20 s queue delay"


def test_a_caller_alone_is_not_held_for_the_delay(model, images):
    """One client, request after request: no other request can join its batch, so none waits the 20 s delay."""

    async def scenario():
        batcher = make(model, max_queue_delay_us=20_000_000)
        start = time.monotonic()
        results = [await batcher.infer({"image": rows(images, i)}, 1, ["logits"]) for i in range(3)]
        elapsed = time.monotonic() - start
        await batcher.close()
        return results, elapsed

    results, elapsed = asyncio.run(scenario())
    assert model.batches == [1, 1, 1]
    assert elapsed < 10, "a lone caller must not wait for the 20 s queue delay"


def test_hold_lone_requests_waits_the_delay_as_triton_does(model, images):
    """cxr.hold_lone_requests: a request alone still waits the whole delay for company."""

    async def scenario():
        batcher = make(model, max_queue_delay_us=300_000, hold_lone_requests=True)
        result = await batcher.infer({"image": rows(images, 0)}, 1, ["logits"])
        await batcher.close()
        return result

    assert asyncio.run(scenario()).queue_s >= 0.29


def test_a_batch_runs_as_soon_as_every_recent_caller_is_back(model, images):
    """Three callers seen; they come back one by one: the batch waits for the third (not for the 20 s delay)."""

    async def scenario():
        batcher = make(model, max_queue_delay_us=20_000_000)
        await seen_callers(batcher, model, images, 3)
        start = time.monotonic()
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(batcher.infer({"image": rows(images, i)}, 1, ["logits"])))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        await batcher.close()
        return results, elapsed

    results, elapsed = asyncio.run(scenario())
    assert model.batches == [3], "the first two must wait for the third caller, then all run as one batch"
    assert elapsed < 10


def test_the_callers_seen_are_forgotten_after_a_quiet_window():
    """The peak of requests in flight lasts one to two windows (at least 1 s, or four batch computations)."""
    seen = _Concurrency(window_s=1.0)
    seen.seen(5, now=0.0)
    seen.seen(1, now=1.5)  # a new window: the last one's peak still counts
    assert seen.peak == 5
    seen.seen(1, now=2.6)
    assert seen.peak == 1
    seen.seen(1, now=10.0)  # more than two windows of silence: nothing from before
    assert seen.peak == 1
    seen.computed(3.0)  # a slow model: its callers come back only after a long batch
    seen.seen(6, now=11.0)
    seen.seen(1, now=20.0)
    assert seen.peak == 6, "a window is four batch computations long for a slow model"


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute(model, images):
    async def scenario():
        batcher = make(model, max_queue_delay_us=600_000)
        await seen_callers(batcher, model, images, 4)
        loop_deadline = time.monotonic() + 0.1
        short = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["logits"], deadline=loop_deadline))
        patient = asyncio.create_task(batcher.infer({"image": rows(images, 1, 2)}, 2, ["logits"]))
        with pytest.raises(ServiceError) as error:
            await short
        result = await patient
        await batcher.close()
        return error.value, result

    error, result = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not computed" in error.message
    assert model.batches == [2], "the expired request's row must not be computed"
    np.testing.assert_array_equal(model.inputs_seen[0], rows(images, 1, 2))
    assert result.outputs["logits"].shape == (2, 3)


def test_queue_policy_timeout_and_its_override(model, images):
    """default_timeout_microseconds drops a queued request; with allow_timeout_override a request's own shorter
    timeout wins; without it the request's timeout is ignored."""

    async def scenario(allow):
        batcher = make(model, max_queue_delay_us=400_000, default_timeout_us=5_000_000, allow_timeout_override=allow)
        await seen_callers(batcher, model, images, 2)
        outcome = await asyncio.gather(
            batcher.infer({"image": rows(images, 0)}, 1, ["logits"], timeout_us=100_000), return_exceptions=True
        )
        await batcher.close()
        return outcome[0]

    overridden = asyncio.run(scenario(True))
    assert isinstance(overridden, ServiceError) and overridden.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert model.batches == []
    kept = asyncio.run(scenario(False))
    assert not isinstance(kept, Exception) and kept.outputs["logits"].shape == (1, 3)

    async def default_only():
        batcher = make(model, max_queue_delay_us=400_000, default_timeout_us=100_000)
        await seen_callers(batcher, model, images, 2)
        outcome = await asyncio.gather(batcher.infer({"image": rows(images, 0)}, 1, ["logits"]), return_exceptions=True)
        await batcher.close()
        return outcome[0]

    dropped = asyncio.run(default_only())
    assert isinstance(dropped, ServiceError) and dropped.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert model.batches == [], "the timed-out request must not be computed"


def test_a_cancelled_request_costs_nothing_and_harms_no_other(model, images):
    async def scenario():
        batcher = make(model, max_queue_delay_us=300_000)
        await seen_callers(batcher, model, images, 3)
        cancelled = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["logits"]))
        kept = asyncio.create_task(batcher.infer({"image": rows(images, 3, 4)}, 2, ["logits"]))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        result = await kept
        pending_after = batcher.pending
        await batcher.close()
        return cancelled, result, pending_after

    cancelled, result, pending_after = asyncio.run(scenario())
    assert cancelled.cancelled()
    assert model.batches == [2], "the cancelled request's row must not be computed"
    np.testing.assert_allclose(
        result.outputs["logits"], model.direct(rows(images, 3, 4))["logits"], rtol=1e-4, atol=1e-5
    )
    assert pending_after == 0


def test_a_full_queue_refuses_at_once_and_the_queued_requests_still_succeed(model, images):
    async def scenario():
        batcher = make(model, max_batch_size=1, max_queue_size=2, max_queue_delay_us=0)
        model.gate = threading.Event()
        running = asyncio.create_task(batcher.infer({"image": rows(images, 0)}, 1, ["logits"]))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
        queued = [asyncio.create_task(batcher.infer({"image": rows(images, i)}, 1, ["logits"])) for i in (1, 2)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(ServiceError) as refused:
            await batcher.infer({"image": rows(images, 3)}, 1, ["logits"])
        refused_after = time.monotonic() - start
        model.gate.set()
        results = await asyncio.gather(running, *queued)
        await batcher.close()
        return refused.value, refused_after, results

    refused, refused_after, results = asyncio.run(scenario())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size" in refused.message
    assert refused_after < 1.0, "a full queue must refuse at once, not after waiting"
    assert len(results) == 3 and model.batches == [1, 1, 1]


def test_a_failing_batch_answers_every_request_and_the_batcher_goes_on(model, images):
    async def scenario():
        batcher = make(model, max_queue_delay_us=100_000)
        bad = {"image": np.zeros((1, 1, 8, 8), np.uint8)}  # wrong size: onnxruntime itself fails
        outcomes = await asyncio.gather(batcher.infer(bad, 1, ["logits"]), return_exceptions=True)
        good = await batcher.infer({"image": rows(images, 0)}, 1, ["logits"])
        await batcher.close()
        return outcomes[0], good

    failed, good = asyncio.run(scenario())
    assert isinstance(failed, ServiceError) and failed.code == grpc.StatusCode.INTERNAL
    assert good.outputs["logits"].shape == (1, 3)


def test_close_lets_queued_requests_finish_and_then_refuses(model, images):
    async def scenario():
        batcher = make(model, max_queue_delay_us=200_000)
        queued = [asyncio.create_task(batcher.infer({"image": rows(images, i)}, 1, ["logits"])) for i in range(3)]
        await asyncio.sleep(0.01)
        await batcher.close(timeout=10)
        results = await asyncio.gather(*queued)
        with pytest.raises(ServiceError) as refused:
            await batcher.infer({"image": rows(images, 0)}, 1, ["logits"])
        return results, refused.value

    results, refused = asyncio.run(scenario())
    assert len(results) == 3 and sum(model.batches) == 3
    assert refused.code == grpc.StatusCode.UNAVAILABLE
