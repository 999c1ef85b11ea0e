"""A TCP proxy that holds every chunk for a fixed time in each direction: WAN latency
where the kernel has no netem qdisc. TLS passes through it untouched (the client still
verifies the server's certificate end to end).

    python -m experiments.delay_proxy --listen 127.0.0.1:9100 --to 198.51.100.1:9093 \\
        --delay-ms 20      # 20 ms each way: 40 ms added to every round trip
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Forward `reader` to `writer`, each chunk `delay_s` after it arrived, in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def release() -> None:
        while (item := await queue.get()) is not None:
            due, chunk = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(release())
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, chunk))
    queue.put_nowait(None)
    with contextlib.suppress(ConnectionError):
        await sender


async def serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
    async def connect(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, server_writer, delay_s),
                             _pump(server_reader, client_writer, delay_s))

    server = await asyncio.start_server(connect, *listen)
    async with server:
        await server.serve_forever()


def _address(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.delay_proxy")
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--to", type=_address, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one way")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
