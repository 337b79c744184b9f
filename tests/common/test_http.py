"""services/common/http.py: uvicorn inside the caller's loop on a port we bind (0 picks one), a graceful stop that
lets a request in progress finish, the body limit, and the servicer-method unwrapping the HTTP adapters use."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from starlette.requests import Request  # module level: FastAPI resolves annotations here

from services.common.errors import ServiceError, aborts_on_error
from services.common.http import BodyTooLarge, HttpServer, read_body, unwrapped


def _app(started: asyncio.Event):
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    app = FastAPI()

    @app.get("/slow")
    async def slow():
        started.set()
        await asyncio.sleep(0.5)
        return {"done": True}

    @app.post("/echo")
    async def echo(request: Request):
        try:
            return JSONResponse({"size": len(await read_body(request, 10))})
        except BodyTooLarge as e:
            return JSONResponse({"error": str(e)}, status_code=413)

    return app


async def _get(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    method = "POST" if body is not None else "GET"
    extra = f"Content-Length: {len(body)}\r\n" if body is not None else ""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode() + (body or b""))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, content = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), content


def test_serves_in_the_loop_and_stops_after_the_request_in_progress():
    async def main():
        started = asyncio.Event()
        server = HttpServer(_app(started), "127.0.0.1", 0, grace_period_s=5)
        port = await server.start()
        assert port > 0 and server.port == port
        assert await _get(port, "/echo", b"12345") == (200, b'{"size":5}')
        status, content = await _get(port, "/echo", b"x" * 11)
        assert status == 413 and b"limit of 10 bytes" in content
        slow = asyncio.create_task(_get(port, "/slow"))
        await started.wait()
        await server.stop()  # the request in progress is answered before the server is gone
        assert await slow == (200, b'{"done":true}')
        with pytest.raises(OSError):
            await _get(port, "/slow")
        with socket.socket() as probe:  # the listener is closed: a restarted server can bind the port again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()

    asyncio.run(main())


def test_a_taken_port_is_an_oserror():
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = HttpServer(_app(asyncio.Event()), "127.0.0.1", taken.getsockname()[1])
            with pytest.raises(OSError):
                await server.start()

    asyncio.run(main())


def test_unwrapped_servicer_methods_raise_the_service_error_whole():
    class Servicer:
        @aborts_on_error
        async def Method(self, request, context):
            raise ServiceError(grpc.StatusCode.NOT_FOUND, "no such thing", "no_thing")

        async def Plain(self, request, context):
            return request

    servicer = Servicer()
    with pytest.raises(ServiceError) as error:
        asyncio.run(unwrapped(servicer.Method)("request", None))
    assert (error.value.code, error.value.reason) == (grpc.StatusCode.NOT_FOUND, "no_thing")
    assert asyncio.run(unwrapped(servicer.Plain)("request", None)) == "request"
