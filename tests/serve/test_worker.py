"""A replica's model process (raylm/serve/worker.py) without Serve: it answers through the socket, ends
when its replica's end of the socket closes, and when it dies the requests and calls it held fail with
the reason (Serve's health check then replaces the replica: Server.check_health)."""

import os
import queue
import signal
import socket

import pytest

from raylm.serve.engine import Request
from raylm.spec.generation import GenerationSpec


@pytest.fixture(scope="module")
def spec(reference_run):
    from raylm.spec.loading import validate_dict

    return validate_dict({"kind": "serve", "model": str(reference_run[0] / "model")}).model_dump(mode="json")


def request(tokenizer, events: queue.Queue) -> Request:
    ids = tokenizer("The king")["input_ids"]
    return Request(ids, GenerationSpec(max_new_tokens=8), emit=lambda *event: events.put(event))


def finished(events: queue.Queue) -> tuple:
    while True:
        event = events.get(timeout=60)
        if event[2] is not None:
            return event


def test_the_model_process_answers_and_ends_with_its_replica(spec):
    """It answers a request and a call, survives a call whose caller gave up, and exits when the
    replica's end of the socket goes."""
    from raylm.serve.worker import EngineProcess

    engine = EngineProcess(spec)
    events: queue.Queue = queue.Queue()
    asked = request(engine.tokenizer, events)
    engine.submit([asked])
    assert finished(events)[2] in ("stop", "length") and asked.token_ids[0]
    assert engine.call("compiled_steps").result(timeout=60) == 0
    # a call whose caller gave up (a timed-out logprobs request, a disconnected /health) gets its
    # answer dropped: the reader goes on delivering text (it used to die on the cancelled future)
    os.kill(engine.process.pid, signal.SIGSTOP)
    abandoned = engine.call("compiled_steps")
    assert abandoned.cancel()
    os.kill(engine.process.pid, signal.SIGCONT)
    again = request(engine.tokenizer, events)
    engine.submit([again])
    assert finished(events)[2] in ("stop", "length") and engine.alive()
    # the replica's end of the socket goes, however the replica ends (here: shut down under the reader)
    with socket.socket(fileno=os.dup(engine.conn.fileno())) as end:
        end.shutdown(socket.SHUT_RDWR)
    assert engine.process.wait(timeout=60) == 0


def test_a_model_process_that_dies_fails_what_it_held(spec):
    from raylm.serve.worker import EngineError, EngineProcess

    engine = EngineProcess(spec)
    try:
        os.kill(engine.process.pid, signal.SIGSTOP)  # it cannot answer before it is killed
        events: queue.Queue = queue.Queue()
        held = request(engine.tokenizer, events)
        engine.submit([held])
        call = engine.call("compiled_steps")
        os.kill(engine.process.pid, signal.SIGKILL)
        assert finished(events)[2] == "error"
        assert isinstance(held.error, EngineError) and "the model's process ended" in str(held.error)
        with pytest.raises(EngineError):
            call.result(timeout=60)
        assert not engine.alive()
        later: queue.Queue = queue.Queue()  # refused at once, not left waiting
        engine.submit([request(engine.tokenizer, later)])
        assert later.get(timeout=5)[2] == "error"
        with pytest.raises(EngineError):
            engine.call("compiled_steps").result(timeout=5)
    finally:
        engine.close()
