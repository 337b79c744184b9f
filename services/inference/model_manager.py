"""The repository manager: which models and versions are loaded, loading, unloading and atomic reloading.

A model folder that is missing pieces or whose ONNX file does not match its config.pbtxt is reported (with its
reason) in RepositoryIndex, while every other model serves. A reload builds the new versions completely (sessions
created and warmed up) before one assignment swaps them in; requests already holding the old version finish on it,
and the old version's batcher is drained and closed in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cxr import datatypes, repository
from cxr.generated.inference.model_config_pb2 import ModelConfig
from services.common.errors import ServiceError, not_found, unavailable
from services.inference.batcher import BatcherSettings, DynamicBatcher
from services.inference.config import InferenceSettings
from services.inference.metrics import InferenceMetrics, VersionMeters
from services.inference.sessions import SessionPool, choose_providers
from services.inference.tensors import TensorSpec, datatype_name

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStats:
    """Triton's ModelStatistics counters for one version."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))


@dataclass
class ModelVersion:
    """One loaded, warmed-up version: what a request needs to be validated, batched and computed."""

    name: str
    version: int
    config: ModelConfig
    labels: list[str]
    sha256: str
    pool: SessionPool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batcher: DynamicBatcher | None = None
    meters: VersionMeters | None = None
    stats: VersionStats = field(default_factory=VersionStats)

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size


@dataclass
class ModelEntry:
    """A model as the server sees it: its served versions, and the reasons of versions that failed."""

    name: str
    state: str
    reason: str = ""
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    def newest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


MAX_NAME_BYTES = 255  # one path component on every common filesystem


def valid_model_name(name: str) -> bool:
    """A name that can be a model folder: one path component, no control characters, at most 255 bytes."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and len(name.encode("utf-8", "replace")) <= MAX_NAME_BYTES
    )


def _shown(name: str) -> str:
    """A client's model name as quoted back in a message: repr, cut short."""
    return repr(name) if len(name) <= 64 else repr(name[:64]) + f"... ({len(name)} characters)"


def _specs(config_tensors) -> list[TensorSpec]:
    return [TensorSpec(t.name, datatype_name(t.data_type), tuple(int(d) for d in t.dims)) for t in config_tensors]


def _check_against_session(kind: str, specs: list[TensorSpec], node_args, max_batch_size: int, every: bool) -> None:
    """The config's tensors must exist in the ONNX graph with the same type and compatible dims."""
    graph = {a.name: a for a in node_args}
    for spec in specs:
        arg = graph.get(spec.name)
        if arg is None:
            raise ValueError(f"config {kind} {spec.name!r} is not in the ONNX graph, which has {sorted(graph)}")
        try:
            graph_type = datatypes.by_onnx(arg.type).name
        except datatypes.TensorError:
            graph_type = arg.type
        if graph_type != spec.datatype:
            raise ValueError(f"config {kind} {spec.name!r} is {spec.datatype} but the ONNX graph has {graph_type}")
        shape = datatypes.config_dims(arg.shape, max_batch_size, f"{kind} {spec.name!r} of the ONNX graph")
        if len(shape) != len(spec.dims) or any(g > 0 and d != -1 and g != d for g, d in zip(shape, spec.dims)):
            raise ValueError(f"config {kind} {spec.name!r} has dims {list(spec.dims)} but the ONNX graph has {shape}")
    if every:
        missing = sorted(set(graph) - {s.name for s in specs})
        if missing:
            raise ValueError(f"the ONNX graph needs {kind}s {missing} that config.pbtxt does not declare")


def _parameter(config: ModelConfig, key: str) -> str:
    return config.parameters[key].string_value.strip() if key in config.parameters else ""


def batcher_settings(config: ModelConfig, instances: int) -> BatcherSettings:
    """The config's dynamic_batching as batcher settings; without dynamic_batching requests still run in
    batches of one (Triton's default scheduler)."""
    batching = config.dynamic_batching
    policy = batching.default_queue_policy
    enabled = config.HasField("dynamic_batching") and config.max_batch_size > 0
    return BatcherSettings(
        max_batch_size=config.max_batch_size if enabled else 0,
        preferred_batch_sizes=tuple(int(b) for b in batching.preferred_batch_size if 0 < b <= config.max_batch_size),
        max_queue_delay_us=int(batching.max_queue_delay_microseconds),
        max_queue_size=int(policy.max_queue_size),
        default_timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=bool(policy.allow_timeout_override),
        instances=instances,
        hold_lone_requests=_parameter(config, "cxr.hold_lone_requests").lower() == "true",
    )


class ModelManager:
    """Loads models from the repository and hands out the version a request asks for."""

    def __init__(self, settings: InferenceSettings, metrics: InferenceMetrics, compute: Executor):
        self.settings = settings
        self.repository = Path(settings.repository)
        self.metrics = metrics
        self.compute = compute
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-load")
        self._retiring: set[asyncio.Task] = set()

    # ---- loading -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the model control mode says: everything (`none`), or the listed models (`explicit`)."""
        if not self.repository.is_dir():
            raise SystemExit(f"model repository {self.repository} is not a folder")
        names = repository.list_models(self.repository)
        if self.settings.model_control == "explicit":
            wanted = self.settings.load_models
            if "*" not in wanted:
                names = list(wanted)  # a name without a folder is recorded as UNAVAILABLE by load()
        await asyncio.gather(*(self.load(n, raise_errors=False) for n in names))

    def _folder_exists(self, name: str) -> bool:
        # Checked before the name touches the filesystem: one path component of a length any filesystem takes,
        # so a request can neither reach folders outside the repository nor make the lookup itself fail.
        return valid_model_name(name) and (self.repository / name).is_dir()

    def _scrub(self, text: str) -> str:
        """A message without the server's own paths (onnxruntime and file errors quote absolute paths)."""
        for prefix in {str(self.repository.resolve()), str(self.repository)}:
            if prefix and prefix != ".":
                text = text.replace(prefix + "/", "").replace(prefix, "<repository>")
        return text

    async def load(self, name: str, *, raise_errors: bool = True) -> ModelEntry:
        """(Re)load a model: build every served version, then swap them in at once. On failure a model that was
        serving keeps serving its old versions."""
        if not self._folder_exists(name):
            if raise_errors:
                raise not_found(
                    f"no model {_shown(name)} in the repository; models: {repository.list_models(self.repository)}"
                )
            return self.models.setdefault(name, ModelEntry(name, UNAVAILABLE, "no such folder in the model repository"))
        async with self._locks[name]:
            old = self.models.get(name)
            if old is None or old.state != READY:
                self.models[name] = ModelEntry(name, LOADING)
            loop = asyncio.get_running_loop()
            try:
                entry = await loop.run_in_executor(self._loader, self._build, name)
            except Exception as e:  # noqa: BLE001 - any broken model is reported, never fatal
                reason = self._scrub(str(e) or type(e).__name__)
                log.error("model %s failed to load: %s", name, reason)
                if old is not None and old.state == READY:
                    self.models[name] = old
                else:
                    self.models[name] = ModelEntry(name, UNAVAILABLE, reason)
                if raise_errors:
                    raise ServiceError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"failed to load model {name!r}: {reason}", "load"
                    ) from None
                return self.models[name]
            for version in entry.versions.values():
                self._attach_batcher(version)
            self.models[name] = entry  # the atomic swap: new requests see only the new versions from here on
            if old is not None:
                self._retire(old)
            log.info(
                "model %s ready: versions %s%s",
                name,
                sorted(entry.versions),
                f" (failed: {entry.failed})" if entry.failed else "",
            )
            return entry

    def _build(self, name: str) -> ModelEntry:
        """Read the config and create, check and warm up the sessions of every version the policy serves
        (in a worker thread)."""
        model_dir = self.repository / name
        config = repository.read_config(model_dir)
        if config.platform not in ("", repository.PLATFORM) or config.backend not in ("", "onnxruntime"):
            raise ValueError(
                f"platform {config.platform or config.backend!r} is not served here; only {repository.PLATFORM!r}"
            )
        if not config.input or not config.output:
            raise ValueError("config.pbtxt must declare its inputs and outputs")
        for tensor in [*config.input, *config.output]:
            if tensor.data_type not in [d.config for d in datatypes.DATATYPES if d.servable]:
                raise ValueError(f"tensor {tensor.name!r} has unsupported data_type {tensor.data_type}")
        present = repository.list_versions(model_dir)
        served = repository.select_versions(config, present)
        entry = ModelEntry(name, UNAVAILABLE, config=config)
        if config.version_policy.WhichOneof("policy_choice") == "specific":
            for v in sorted(set(config.version_policy.specific.versions) - set(present)):
                entry.failed[int(v)] = f"version {v} is named in version_policy but has no folder"
        if not served:
            raise ValueError(
                f"no version folder to serve (present: {present}, version_policy: "
                f"{config.version_policy.WhichOneof('policy_choice') or 'latest 1'})"
            )
        labels = repository.read_labels(model_dir)
        inputs, outputs = _specs(config.input), _specs(config.output)
        providers = choose_providers(self.settings.providers, config)
        for v in served:
            try:
                entry.versions[v] = self._build_version(model_dir, v, config, labels, inputs, outputs, providers)
            except Exception as e:  # noqa: BLE001 - one broken version does not stop the others
                entry.failed[v] = self._scrub(str(e) or type(e).__name__)
                log.error("model %s version %s failed to load: %s", name, v, entry.failed[v])
        if not entry.versions:
            raise ValueError("; ".join(f"version {v}: {r}" for v, r in sorted(entry.failed.items())))
        entry.state = READY
        return entry

    def _build_version(
        self,
        model_dir: Path,
        version: int,
        config: ModelConfig,
        labels: list[str],
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        providers: list[str],
    ) -> ModelVersion:
        path = repository.model_path(model_dir, version, config)
        if not path.is_file():
            raise ValueError(f"{path.relative_to(self.repository)} is missing")
        sha256 = repository.sha256_file(path)
        pool = SessionPool(
            path,
            config,
            providers=providers,
            intra_op_threads=self.settings.intra_op_threads,
            inter_op_threads=self.settings.inter_op_threads,
            graph_optimization=self.settings.graph_optimization,
            spin_wait=self.settings.spin_wait,
        )
        _check_against_session("input", inputs, pool.inputs(), config.max_batch_size, every=True)
        _check_against_session("output", outputs, pool.outputs(), config.max_batch_size, every=False)
        if self.settings.warmup:
            batch = [1] if config.max_batch_size > 0 else []
            pool.warm_up({s.name: np.zeros(batch + [d if d > 0 else 1 for d in s.dims], dtype=s.dtype) for s in inputs})
        log.info(
            "model %s version %s loaded on %s (%d instance(s) x %d intra-op thread(s), sha256 %s)",
            config.name,
            version,
            pool.providers,
            pool.count,
            pool.threads,
            sha256[:12],
        )
        return ModelVersion(config.name, version, config, labels, sha256, pool, inputs, outputs)

    def _attach_batcher(self, version: ModelVersion) -> None:
        meters = version.meters = self.metrics.for_version(version.name, str(version.version))
        stats = version.stats

        def on_batch(rows: int, compute_s: float) -> None:
            meters.batch_size.observe(rows)
            meters.compute_seconds.observe(compute_s)
            stats.execution_count += 1
            stats.inference_count += rows
            stats.compute_infer.add(compute_s, rows)
            stats.batches[rows].add(compute_s)
            stats.last_inference_ms = int(time.time() * 1000)

        version.batcher = DynamicBatcher(
            version.pool.run,
            batcher_settings(version.config, version.pool.count),
            executor=self.compute,
            on_batch=on_batch,
            name=f"{version.name}:{version.version}",
        )
        version.batcher.start()

    def _retire(self, entry: ModelEntry) -> None:
        """Let an old model's requests finish in the background, then close its batchers."""

        async def retire() -> None:
            await asyncio.gather(
                *(
                    v.batcher.close(self.settings.grace_period_s)
                    for v in entry.versions.values()
                    if v.batcher is not None
                )
            )

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        async with self._locks[name]:
            entry = self.models.get(name)
            if entry is None or entry.state != READY:
                if not self._folder_exists(name):
                    raise not_found(f"no model {_shown(name)} to unload; models: {sorted(self.models)}")
                self.models[name] = ModelEntry(name, UNAVAILABLE, "unloaded")
                return
            self.models[name] = ModelEntry(name, UNAVAILABLE, "unloaded", config=entry.config)
            self._retire(entry)
            log.info("model %s unloaded", name)

    async def close(self, timeout: float) -> None:
        for entry in list(self.models.values()):
            if entry.state == READY:
                self._retire(entry)
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- lookups -----------------------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version a request asks for: empty means the newest served version.

        NOT_FOUND: no such model or version; UNAVAILABLE: the model exists but is not loaded or failed to load.
        """
        entry = self.models.get(name)
        if entry is None:
            if self._folder_exists(name):
                raise unavailable(f"model {name!r} is not loaded")
            raise not_found(f"unknown model {_shown(name)}; models: {sorted(n for n, e in self.models.items())}")
        if entry.state != READY:
            raise unavailable(f"model {name!r} is not ready ({entry.state.lower()}: {entry.reason or 'no reason'})")
        if not version:
            return entry.newest()
        try:
            number = int(version)
        except ValueError:
            raise not_found(f"model {name!r} has no version {version!r} (versions are integers)") from None
        found = entry.versions.get(number)
        if found is None:
            if number in entry.failed:
                raise unavailable(f"model {name!r} version {number} failed to load: {entry.failed[number]}")
            raise not_found(f"model {name!r} has no version {number}; served versions: {sorted(entry.versions)}")
        return found

    def ready_versions(self) -> list[ModelVersion]:
        return [v for e in self.models.values() if e.state == READY for v in e.versions.values()]

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model folder in the repository and every model known."""
        names = set(self.models)
        if self.repository.is_dir():
            names |= set(repository.list_models(self.repository))
        rows = []
        for name in sorted(names):
            entry = self.models.get(name)
            if entry is None:
                rows.append((name, "", UNAVAILABLE, "not loaded"))
                continue
            if entry.state == READY:
                rows += [(name, str(v), READY, "") for v in sorted(entry.versions)]
                rows += [(name, str(v), UNAVAILABLE, r) for v, r in sorted(entry.failed.items())]
            else:
                rows.append((name, "", entry.state, entry.reason))
        return rows
