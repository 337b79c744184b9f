"""Closed-loop Classify load through the gateway: N client threads, each on its own channel, sending one request
after another with its own request id. Shared by bench/soak.py and the fault tests (tests/e2e/test_faults.py).

Every request is recorded with the code it got and the request id it was answered with, so a run can say how
many were answered, with which codes, and whether any answer was lost (a call that never returned), duplicated
(an id answered twice) or mismatched (answered with another request's id).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc


@dataclass(frozen=True)
class Answer:
    request_id: str
    code: str  # grpc.StatusCode name
    answered_id: str  # the request id in the response ("" for an error)
    done_at: float  # time.monotonic()
    details: str = ""


class ClassifyLoad:
    def __init__(
        self,
        address: str,
        image: bytes,
        clients: int = 8,
        model_name: str = "",
        timeout_s: float = 30.0,
        prefix: str = "load",
    ):
        self.address, self.image, self.clients = address, image, clients
        self.model_name, self.timeout_s, self.prefix = model_name, timeout_s, prefix
        self.answers: list[Answer] = []
        self.sent: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ClassifyLoad:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True, name=f"load-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def _client(self, index: int) -> None:
        channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        stub = gateway_pb2_grpc.GatewayStub(channel)
        seq = 0
        try:
            while not self._stop.is_set():
                request_id = f"{self.prefix}-{index}-{seq}"
                seq += 1
                with self._lock:
                    self.sent.append(request_id)
                request = pb.ClassifyRequest(image=self.image, model_name=self.model_name, request_id=request_id)
                try:
                    response = stub.Classify(request, timeout=self.timeout_s)
                    answer = Answer(request_id, "OK", response.request_id, time.monotonic())
                except grpc.RpcError as exc:
                    answer = Answer(request_id, exc.code().name, "", time.monotonic(), exc.details() or "")
                with self._lock:
                    self.answers.append(answer)
                if answer.code != "OK":
                    time.sleep(0.02)  # a refusing server is not hammered in a tight loop
        finally:
            channel.close()

    def mark(self) -> int:
        """The number of answers so far: slice `answers[mark:]` for what came after a moment."""
        with self._lock:
            return len(self.answers)

    def wait_answers(self, count: int, since: int = 0, code: str | None = None, timeout: float = 120.0) -> None:
        """Wait until `count` answers (with `code`, if given) arrived after mark `since`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = sum(1 for a in self.answers[since:] if code is None or a.code == code)
            if got >= count:
                return
            time.sleep(0.02)
        raise TimeoutError(
            f"only {got} answers{f' with {code}' if code else ''} after {timeout:.0f} s (wanted {count})"
        )

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout if timeout is not None else self.timeout_s + 10)

    def codes(self, since: int = 0, until: int | None = None) -> Counter:
        with self._lock:
            return Counter(a.code for a in self.answers[since:until])

    def integrity(self) -> dict[str, int]:
        """lost: sent, never answered; duplicated: an id answered more than once; mismatched: answered with
        another id."""
        with self._lock:
            answered = Counter(a.request_id for a in self.answers)
            mismatched = sum(1 for a in self.answers if a.code == "OK" and a.answered_id != a.request_id)
            sent = list(self.sent)
        return {
            "sent": len(sent),
            "answered": sum(answered.values()),
            "lost": sum(1 for rid in sent if rid not in answered),
            "duplicated": sum(n - 1 for n in answered.values() if n > 1),
            "mismatched": mismatched,
        }
