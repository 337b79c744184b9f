"""The spool: what the node has acknowledged and not yet finished, on disk, so that a crash loses nothing.

    spool/incoming/<key>.dcm        received and acknowledged, not yet classified
    spool/outbox/<key>/             results written (sr.dcm, sc.dcm) and state.json: the destinations still to reach
    spool/dead-letter/<key>/        given up on: the results (or the source instance) and reason.json
    spool/tmp/                      files being written; emptied at start (a crash there lost nothing acknowledged)

`key` is a hash of the source SOP Instance UID: file names carry no identifier, and a re-sent instance lands on
the same key. Every step is write-to-tmp, fsync, rename, fsync the folder: a file under incoming/ or outbox/ is
always whole. The order of the steps makes a crash at any point safe:

1. accept(): incoming/<key>.dcm is durable *before* the C-STORE success goes back.
2. commit_results(): outbox/<key>/ is durable before incoming/<key>.dcm is removed. A crash between the two
   leaves both; the restart sees the outbox entry and only sends (the results are not made twice).
3. mark_delivered(): state.json is rewritten after each destination that stored the objects; a crash before
   that re-sends to it, which stores nothing new (same SOP Instance UIDs).
4. finish(): the outbox entry is removed once every destination has the objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def instance_key(sop_instance_uid: str) -> str:
    """The spool key (and log id) of a SOP instance: a hash, so no UID appears in file names or logs."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class OutboxState:
    """What an outbox entry still has to do, kept in its state.json."""

    received_at: float  # wall-clock time the source instance was received (end-to-end latency)
    pending: list[str]  # destinations (their names) still to reach
    delivered: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # failed tries per destination
    errors: dict[str, str] = field(default_factory=dict)  # last error per destination (our own words, no PHI)
    summary: dict = field(default_factory=dict)  # model, version, top class, result UIDs: for logs and recovery

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> OutboxState:
        return cls(**json.loads(data))


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.dead_letter = self.root / "dead-letter"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.outbox, self.dead_letter, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        # whatever is in tmp/ was never acknowledged (or is a copy of something that was committed)
        for leftover in self.tmp.iterdir():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def _tmp_path(self, key: str) -> Path:
        return self.tmp / f"{key}.{uuid.uuid4().hex[:8]}"

    # ---- 1. received ----------------------------------------------------------------------------------
    def accept(self, key: str, data: bytes) -> Path:
        """Make a received instance durable (call before answering C-STORE success)."""
        tmp = self._tmp_path(key)
        _write_durable(tmp, data)
        target = self.incoming / f"{key}.dcm"
        os.replace(tmp, target)  # a re-sent instance replaces the waiting copy: one entry per SOP instance
        _fsync_dir(self.incoming)
        return target

    def incoming_path(self, key: str) -> Path:
        return self.incoming / f"{key}.dcm"

    def received_at(self, key: str) -> float:
        try:
            return self.incoming_path(key).stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def discard_incoming(self, key: str) -> None:
        """Drop a received instance that needs no results (refused by the gateway's reader or gate)."""
        self.incoming_path(key).unlink(missing_ok=True)
        _fsync_dir(self.incoming)

    # ---- 2. results written -----------------------------------------------------------------------------
    def has_outbox(self, key: str) -> bool:
        return (self.outbox / key / "state.json").is_file()

    def commit_results(self, key: str, objects: dict[str, bytes], state: OutboxState) -> None:
        """Make the result objects and their delivery state durable, then drop the source instance."""
        target = self.outbox / key
        if not target.exists():
            tmp = self._tmp_path(key)
            tmp.mkdir()
            for name, data in objects.items():
                _write_durable(tmp / name, data)
            _write_durable(tmp / "state.json", state.to_json())
            _fsync_dir(tmp)
            os.rename(tmp, target)
            _fsync_dir(self.outbox)
        self.discard_incoming(key)

    def read_state(self, key: str) -> OutboxState:
        return OutboxState.from_json((self.outbox / key / "state.json").read_bytes())

    def write_state(self, key: str, state: OutboxState) -> None:
        tmp = self._tmp_path(key)
        _write_durable(tmp, state.to_json())
        os.replace(tmp, self.outbox / key / "state.json")
        _fsync_dir(self.outbox / key)

    def result_objects(self, key: str) -> dict[str, bytes]:
        """The result objects of an outbox entry, by file name (sr.dcm, sc.dcm)."""
        return {p.name: p.read_bytes() for p in sorted((self.outbox / key).glob("*.dcm"))}

    # ---- 4. done ------------------------------------------------------------------------------------
    def finish(self, key: str) -> None:
        shutil.rmtree(self.outbox / key, ignore_errors=True)
        _fsync_dir(self.outbox)

    # ---- given up -------------------------------------------------------------------------------------
    def to_dead_letter(self, key: str, reason: dict) -> Path:
        """Move an outbox entry (or, failing that, the source instance) to dead-letter/<key>/ with reason.json."""
        target = self.dead_letter / key
        if target.exists():  # an earlier dead letter of the same instance: keep the newest
            shutil.rmtree(target)
        source = self.outbox / key
        if source.is_dir():
            os.rename(source, target)
            _fsync_dir(self.outbox)
        else:
            target.mkdir()
            if self.incoming_path(key).exists():
                os.rename(self.incoming_path(key), target / "source.dcm")
                _fsync_dir(self.incoming)
        _write_durable(target / "reason.json", json.dumps({"time": time.time(), **reason}, indent=1).encode())
        _fsync_dir(target)
        _fsync_dir(self.dead_letter)
        return target

    # ---- what a restart finds ---------------------------------------------------------------------------
    def pending_incoming(self) -> list[str]:
        return sorted(p.stem for p in self.incoming.glob("*.dcm"))

    def pending_outbox(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir() if (p / "state.json").is_file())

    def depth(self) -> dict[str, int]:
        return {
            "incoming": sum(1 for _ in self.incoming.glob("*.dcm")),
            "outbox": sum(1 for p in self.outbox.iterdir() if p.is_dir()),
            "dead_letter": sum(1 for p in self.dead_letter.iterdir() if p.is_dir()),
        }
