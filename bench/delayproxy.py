#!/usr/bin/env python3
"""A TCP proxy that holds every byte ONE_WAY_MS in each direction, so a
connection through it has a round trip of 2 x ONE_WAY_MS: the bench's
stand-in for a real network (this kernel has no netem).

    delayproxy.py LISTEN_ADDR LISTEN_PORT TARGET_ADDR TARGET_PORT ONE_WAY_MS

Order and bytes are kept; a half-close is passed on once the bytes before it
were delivered. Runs until killed.
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except (OSError, RuntimeError):
                    pass
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()


async def main():
    listen, lport, target, tport, one_way_ms = sys.argv[1:6]
    delay = float(one_way_ms) / 1000.0

    async def handle(c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection(target, int(tport))
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(
            pipe(c_reader, s_writer, delay), pipe(s_reader, c_writer, delay)
        )
        for w in (c_writer, s_writer):
            w.close()

    server = await asyncio.start_server(handle, listen, int(lport))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
