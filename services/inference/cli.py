"""`cxr serve inference`: flags override CXR_INFERENCE_* environment variables. Heavy imports happen in run()."""

from __future__ import annotations

import argparse

from services.inference.config import InferenceSettings

# flag -> settings field, for the flags that take a value
_FLAGS = {
    "repository": "repository", "host": "host", "port": "port", "metrics_port": "metrics_port",
    "model_control": "model_control", "load_model": "load_models", "providers": "providers",
    "intra_op_threads": "intra_op_threads", "inter_op_threads": "inter_op_threads",
    "graph_optimization": "graph_optimization", "compute_threads": "compute_threads",
    "grace_period": "grace_period_s", "drain_delay": "drain_delay_s", "log_level": "log_level",
    "tls_cert": "tls_cert", "tls_key": "tls_key", "tls_client_ca": "tls_client_ca",
    "auth_token_file": "auth_token_file", "auth_scope": "auth_scope",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = InferenceSettings.model_fields

    def doc(name: str) -> str:
        return fields[name].description or ""

    parser.add_argument("--repository", help="model repository folder (Triton layout) [CXR_INFERENCE_REPOSITORY]")
    parser.add_argument("--host", help=doc("host"))
    parser.add_argument("--port", type=int, help="gRPC port (default 8001; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 8002; 0 picks a free one; -1 off)")
    parser.add_argument("--model-control", choices=["none", "explicit"], help="Triton's model control mode")
    parser.add_argument("--load-model", action="append", help="with explicit control: load at start (repeat; '*' all)")
    parser.add_argument("--providers", type=lambda s: [p for p in s.split(",") if p],
                        help="onnxruntime providers in order, comma-separated (default: CUDA where usable, else CPU)")
    parser.add_argument("--intra-op-threads", type=int, help="onnxruntime intra-op threads (0 default)")
    parser.add_argument("--inter-op-threads", type=int, help="onnxruntime inter-op threads (0 default)")
    parser.add_argument("--graph-optimization", choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--compute-threads", type=int, help="threads that run onnxruntime (0: 4)")
    parser.add_argument("--grace-period", type=float, help="seconds to drain on SIGTERM (default 10)")
    parser.add_argument("--drain-delay", type=float, help="seconds to keep answering after readiness turns false")
    parser.add_argument("--spin-wait", dest="spin_wait", action=argparse.BooleanOptionalAction, default=None,
                        help="let idle onnxruntime threads spin for work (default off: the event loop needs the cores)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                        help="skip the warm-up run before a model is reported ready")
    parser.add_argument("--port-file", help="write 'GRPC_PORT METRICS_PORT' here once ready (for tests and scripts)")
    parser.add_argument("--log-level", help="logging level (default INFO)")
    parser.add_argument("--tls-cert", help=doc("tls_cert"))
    parser.add_argument("--tls-key", help=doc("tls_key"))
    parser.add_argument("--tls-client-ca", help=doc("tls_client_ca"))
    parser.add_argument("--auth-token-file", help=doc("auth_token_file") + " (tokens themselves: CXR_INFERENCE_AUTH_TOKENS)")
    parser.add_argument("--auth-scope", choices=["all", "control"], help=doc("auth_scope"))


def settings_from_args(args: argparse.Namespace) -> InferenceSettings:
    """Environment first, then every flag that was given."""
    overrides = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None}
    for switch in ("warmup", "spin_wait"):
        if getattr(args, switch, None) is not None:
            overrides[switch] = getattr(args, switch)
    return InferenceSettings(**overrides)


def run(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from services.common.logging import configure
    from services.inference.server import serve

    settings = settings_from_args(args)
    configure(settings.log_level)

    async def main() -> None:
        started = asyncio.get_running_loop().create_future()
        if args.port_file:
            def write_ports(future: asyncio.Future) -> None:
                if not future.cancelled() and future.exception() is None:
                    grpc_port, metrics_port = future.result()
                    tmp = Path(args.port_file + ".tmp")
                    tmp.write_text(f"{grpc_port} {metrics_port}\n")
                    tmp.replace(args.port_file)
            started.add_done_callback(write_ports)
        await serve(settings, started=started)

    asyncio.run(main())
    return 0
