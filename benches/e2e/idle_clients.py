#!/usr/bin/env python3
"""Opens N keep-alive HTTP/1.1 connections to a proxy, sends one GET on each, reads the
response, then holds every connection open and idle until stdin closes (or SIGTERM).

Used by benches/e2e/idle_memory.sh. Prints one line when all connections are idle:

    ready open=N ok=N failed=F seconds=S

(`ok`: connections whose GET got a 200 and are still open; `failed`: refused, reset, a non-200
answer or a connection closed by the server). Then waits; a second line reports how many of
the connections the server closed while they idled: `closed_while_idle=K`.

    python3 idle_clients.py 127.0.0.1:8080 10000 [concurrency] [hold|close]

With `close` (a warm-up) it closes the connections right after the ready line.
"""

import asyncio
import os
import signal
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: idle-bench\r\nUser-Agent: idle-clients\r\n\r\n"


async def read_response(reader):
    """Reads one response (Content-Length or chunked body) and returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def open_one(host, port, sem, conns, failures):
    async with sem:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            failures.append(f"connect: {e}")
            return
        try:
            writer.write(REQUEST)
            status = await asyncio.wait_for(read_response(reader), 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
            failures.append(f"request: {e!r}")
            writer.close()
            return
        if status != 200:
            failures.append(f"status {status}")
            writer.close()
            return
        conns.append((reader, writer))


async def main():
    addr, n = sys.argv[1], int(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    hold = (sys.argv[4] if len(sys.argv) > 4 else "hold") == "hold"
    host, port = addr.rsplit(":", 1)
    port = int(port)
    sem = asyncio.Semaphore(concurrency)
    conns, failures = [], []
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(host, port, sem, conns, failures) for _ in range(n)))
    seconds = time.monotonic() - t0
    # A connection the server closed shows as EOF on its reader.
    await asyncio.sleep(0.2)
    open_now = sum(1 for r, _ in conns if not r.at_eof())
    print(f"ready open={open_now} ok={len(conns)} failed={len(failures)} seconds={seconds:.1f}",
          flush=True)
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr, flush=True)

    if not hold:
        for _, w in conns:
            w.close()
        return
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: (os.read(sys.stdin.fileno(), 4096), stop.set()))
    await stop.wait()
    closed = sum(1 for r, _ in conns if r.at_eof())
    print(f"closed_while_idle={closed}", flush=True)
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
