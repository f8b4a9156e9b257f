"""Proxy mode's reader of an upstream's Server-Sent Events: every event's data in order, however the bytes
are cut; keep-alives and comments skipped; bounds and stalls are the upstream's errors."""

from __future__ import annotations

import asyncio
import random

import pytest

from hguard.server import upstream as upstream_module
from hguard.server.errors import APIError
from hguard.server.upstream import Events

STREAM = (b": keep-alive\n\n"
          b"data: {\"a\": 1}\n\n"
          b"event: ping\n\n"
          b"data: first line\r\ndata:second line\r\n\r\n"
          b":comment\ndata: {\"b\": \"\xc3\xa9\"}\nid: 7\n\n"
          b"\n\n"
          b"data: [DONE]\n\n"
          b"data: unterminated")
WANT = ['{"a": 1}', "first line\nsecond line", '{"b": "é"}', "[DONE]", "unterminated"]


class _Response:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def aiter_bytes(self):
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece


def _cut(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 12)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


async def _all(events: Events) -> list[str]:
    got = []
    while (data := await events.next()) is not None:
        got.append(data)
    return got


def test_every_event_in_order_however_the_bytes_are_cut():
    rng = random.Random(0)
    for _ in range(200):
        pieces = _cut(STREAM, rng)
        assert asyncio.run(_all(Events(_Response(pieces), timeout=5))) == WANT, pieces


def test_a_line_past_the_bound_is_a_502(monkeypatch):
    monkeypatch.setattr(upstream_module, "MAX_EVENT_BYTES", 64)
    with pytest.raises(APIError) as error:
        asyncio.run(_all(Events(_Response([b"data: 1\n\ndata: " + b"x" * 40, b"x" * 40, b"x" * 40]), timeout=5)))
    assert error.value.status == 502 and "longer" in str(error.value.message)
    with pytest.raises(APIError) as error:  # an event of many short lines
        asyncio.run(_all(Events(_Response([b"data: xxxxxxxxxx\n" * 10 + b"\n"]), timeout=5)))
    assert error.value.status == 502 and "larger" in str(error.value.message)


def test_a_stream_that_stalls_is_a_504():
    class Stalling:
        async def aiter_bytes(self):
            yield b"data: 1\n\n: keep-alive\n\n"
            while True:  # keep-alives only: they do not reset the wait for an event
                await asyncio.sleep(0.05)
                yield b": keep-alive\n\n"

    async def run() -> None:
        events = Events(Stalling(), timeout=0.3)
        assert await events.next() == "1"
        await events.next()

    with pytest.raises(APIError) as error:
        asyncio.run(run())
    assert error.value.status == 504
