"""Decoding in worker processes (optional, `decode_processes` > 0).

The DICOM/JPEG/JPEG 2000 decoders are C and C++ libraries; a hostile file that crashes one (a fault, not an
exception) would take the whole gateway down if it decoded in-process. Here it kills one worker: the pool is
replaced and the requests that were decoding in it are refused with reason "decoder_crashed" (the culprit cannot
be told from the others sharing the pool, so the message invites a retry). Workers are started with "spawn":
forking a process that runs gRPC threads is unsafe.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from cxr.imaging import DecodedImage, ImageError, ImageLimits, read_image

log = logging.getLogger("cxr.gateway.decode")


def _decode(data: bytes, fmt: str | None, limits: ImageLimits) -> tuple[DecodedImage, float]:
    started = time.perf_counter()
    decoded = read_image(data, fmt, limits)
    return decoded, time.perf_counter() - started


class DecodePool:
    def __init__(self, processes: int, limits: ImageLimits):
        self._processes = processes
        self._limits = limits
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._processes, mp_context=self._context)

    def warm_up(self) -> None:
        """Start every worker now (imports included), not on the first requests."""
        futures = [self._pool.submit(_decode, b"", None, self._limits) for _ in range(self._processes)]
        for future in futures:
            try:
                future.result(timeout=120)
            except ImageError:
                pass  # the empty input is refused, as expected: the worker is up

    async def decode(self, data: bytes, fmt: str | None) -> tuple[DecodedImage, float]:
        """(image, seconds spent decoding in the worker); ImageError as read_image raises it."""
        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(_decode, data, fmt, self._limits))
        except BrokenProcessPool:
            if self._pool is pool:  # the first request to notice replaces the pool
                log.error(
                    "a decoder worker died: starting a new pool", extra={"fields": {"processes": self._processes}}
                )
                self._pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            raise ImageError(
                "decoder_crashed",
                "the image decoder crashed while this image was being decoded (it, or one decoded alongside it, is "
                "malformed); retry once if the image is known to be good",
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
