"""Local TCP ports for test servers: pick a free one, see if one is taken, wait for HTTP."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race is still possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def wait_http(url: str, timeout: float, interval: float = 0.1) -> None:  # noqa: ASYNC109
    """Poll ``GET url`` until it answers 200; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not ready after {timeout} s ({last_error})")
            await asyncio.sleep(interval)
