"""Give the C heap back after a large request (glibc only).

A large request leaves the server's RSS high long after it ended, without a leak: tokenising one
1 MB text takes about 240 MB at its peak (the tokenizer's per-token offsets and strings, the id
list), and glibc's malloc keeps the freed pages in its arenas, fragmented among small live blocks,
so neither the heap's top trim nor `MALLOC_ARENA_MAX=2`, `MALLOC_TRIM_THRESHOLD_` or
`MALLOC_MMAP_THRESHOLD_` give them back (measured on the organism: +124 MB after one 1 MB prompt, +146
MB after one round of benchmarks/faults.py's hostile corpus, the same with each of those settings).
`malloc_trim(0)` does: it returns every whole free page of every arena to the system (after that
prompt, RSS was back to its value before it, in 3 to 8 ms).

`TrimAfterLarge` counts each request's body bytes and its response's, and once a request that moved
at least `threshold` bytes has ended, runs `malloc_trim(0)` in a worker thread (off the event loop;
trims never overlap: one asked for while another runs follows it, once). Small requests, the normal
case, never trim. Where the C library has no `malloc_trim` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

LARGE_REQUEST_BYTES = 256 * 1024  # request + response body bytes from which a request is large


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` as a function, or None where the C library has none."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: function(0)


class _Moved:
    """The body bytes one request moves, both ways, counted as they pass."""

    def __init__(self, receive, send) -> None:
        self.bytes, self._receive, self._send = 0, receive, send

    async def receive(self):
        message = await self._receive()
        self.bytes += len(message.get("body", b"")) if message["type"] == "http.request" else 0
        return message

    async def send(self, message) -> None:
        self.bytes += len(message.get("body", b"")) if message["type"] == "http.response.body" else 0
        await self._send(message)


class TrimAfterLarge:
    """ASGI middleware: after a request whose request and response bodies reach `threshold` bytes,
    give the C heap's free pages back (`trim`, glibc's `malloc_trim(0)` unless given)."""

    def __init__(self, app, threshold: int = LARGE_REQUEST_BYTES, trim: Callable[[], object] | None = None) -> None:
        self.app, self.threshold = app, threshold
        self.trim = trim if trim is not None else malloc_trim()
        self.trims = 0  # trims run so far
        self._task: asyncio.Task | None = None
        self._again = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.trim is None:
            return await self.app(scope, receive, send)
        moved = _Moved(receive, send)
        try:
            await self.app(scope, moved.receive, moved.send)
        finally:
            if moved.bytes >= self.threshold:
                self._ask()

    def _ask(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # the running trim may have started before this request's memory was freed
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._again = False
            await loop.run_in_executor(None, self.trim)
            self.trims += 1
            if not self._again:
                return

    async def idle(self) -> None:
        """Wait until no trim runs (tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
