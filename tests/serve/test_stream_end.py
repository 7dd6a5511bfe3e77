"""A stream's text waits up to FLUSH_S between messages, but its end does not: the wait ends as soon as
every choice of the request has finished (an error counts as finished). FLUSH_S is set to 30 s here, so
a wait that missed the end would run into the 10 s limits below instead of returning."""

import asyncio

import pytest

from raylm.serve import app

pytestmark = pytest.mark.quick


def test_the_wait_for_a_flush_ends_when_every_choice_has_finished(monkeypatch):
    monkeypatch.setattr(app, "FLUSH_S", 30.0)

    async def scenario():
        events = app.Events(choices=2)
        events.put_nowait((0, "a", None, 1))
        events.put_nowait((0, "b", "length", 2))
        assert not events.ended.is_set()  # choice 1 is still decoding
        waiting = asyncio.ensure_future(app._until_flush(events))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # waits for the flush or the end
        events.put_nowait((1, "c", "error", 1))
        await asyncio.wait_for(waiting, 10)  # ended by the last finish, not by FLUSH_S
        assert events.ended.is_set()
        await asyncio.wait_for(app._until_flush(events), 10)  # already ended: no wait at all
        got = [events.get_nowait() for _ in range(events.qsize())]
        assert got == [(0, "a", None, 1), (0, "b", "length", 2), (1, "c", "error", 1)]

    asyncio.run(scenario())
