"""The command line of every service: flags generated from its pydantic-settings class, settings from the
environment overridden by the flags given, and running the service with a port file.

    add_settings_arguments(parser, InferenceSettings, flags={"load_models": "--load-model"})
    settings = settings_from_args(InferenceSettings, args)    # env CXR_INFERENCE_*, then the flags given
    run_service(serve, settings, args.port_file)               # asyncio.run(serve(...)), then the port file

One flag per settings field, so a new setting touches one place: `--field-name` (a trailing `_s`, seconds, is
dropped: `grace_period_s` is `--grace-period`); the help is the field's docstring, followed by its default and its
environment variable (docstrings never restate them). Types come from the annotation: bool is `--x/--no-x`, a
Literal is a choice, a list is repeatable and comma-separated, `X | None` is X. Flags default to None, so only a
flag that was given overrides the environment.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from pydantic_settings import BaseSettings


class _ListAction(argparse.Action):
    """A repeatable flag whose values may also be comma-separated: `--x a,b --x c` is [a, b, c]."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items += [item.strip() for item in values.split(",") if item.strip()]
        setattr(namespace, self.dest, items)


def flag_name(field: str) -> str:
    return "--" + field.removesuffix("_s").replace("_", "-")


def _unwrap(annotation):
    """`X | None` and Optional[X] -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _default_text(info) -> str:
    value = info.get_default(call_default_factory=True)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if value is None or value == "":
        return "none"
    return str(value)


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    settings_class: type[BaseSettings],
    *,
    flags: Mapping[str, str] | None = None,
    exclude: Iterable[str] = (),
) -> None:
    """Add one flag per field of `settings_class` (except `exclude`, e.g. secrets that must not appear in a
    process listing). `flags` renames a field's flag (field -> "--flag"); the dest is always the field name."""
    flags = dict(flags or {})
    exclude = set(exclude)
    prefix = settings_class.model_config.get("env_prefix", "")
    for name, info in settings_class.model_fields.items():
        if name in exclude:
            continue
        annotation = _unwrap(info.annotation)
        unit = " (seconds)" if name.endswith("_s") and "second" not in (info.description or "").lower() else ""
        help_text = f"{info.description or ''}{unit} [default: {_default_text(info)}; env {prefix}{name.upper()}]"
        kwargs: dict = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif origin is list:
            kwargs["action"] = _ListAction
            kwargs["metavar"] = "A[,B...]"
        elif annotation in (int, float, str, Path):
            kwargs["type"] = annotation
            if name.endswith("_s"):
                kwargs["metavar"] = "SECONDS"
        else:
            raise TypeError(
                f"{settings_class.__name__}.{name}: no flag for type {annotation!r}; exclude it or "
                "extend services/common/cli.py"
            )
        parser.add_argument(flags.get(name, flag_name(name)), **kwargs)


def settings_from_args(settings_class: type[BaseSettings], args: argparse.Namespace) -> BaseSettings:
    """The settings from the environment, with every flag that was given taking precedence."""
    given = {name: getattr(args, name) for name in settings_class.model_fields if getattr(args, name, None) is not None}
    return settings_class(**given)


def add_port_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port-file",
        help="write 'GRPC_PORT METRICS_PORT HTTP_PORT' here once serving (with port 0: "
        "the ports picked; -1: off); for tests and scripts",
    )


def run_service(serve: Callable[..., Awaitable[None]], settings: BaseSettings, port_file: str | None = None) -> int:
    """Configure the logs, run `serve(settings, started=future)` until it returns, and write the ports it reports
    to `port_file` (atomically: a reader never sees half a file)."""
    import asyncio

    from services.common.logging import configure

    configure(getattr(settings, "log_level", "INFO"))

    async def main() -> None:
        started = asyncio.get_running_loop().create_future()
        if port_file:

            def write_ports(future: asyncio.Future) -> None:
                if not future.cancelled() and future.exception() is None:
                    tmp = Path(port_file + ".tmp")
                    tmp.write_text(" ".join(str(port) for port in future.result()) + "\n")
                    tmp.replace(port_file)

            started.add_done_callback(write_ports)
        await serve(settings, started=started)

    asyncio.run(main())
    return 0
