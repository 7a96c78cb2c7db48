"""What genco changes in Faust's consumer: only an acknowledgement of an event handed on in the current
generation, with the flow running, counts towards a commit. (The failovers it keeps whole, with a real
broker and real processes: tests/test_reliability.py and benchmarks/reliability.py.)"""

from __future__ import annotations

import asyncio

from faust.types import TP, Message

from contract.settings import Settings
from stream.faust_app import GencoApp
from stream.kafka import Connection, Topics

REQUESTS = TP("genco.selection-requests", 0)


def selector_app() -> GencoApp:
    """The selector's app, subscribed to the requests with acknowledgements on and its flow running, as
    between rebalances (never connected: nothing here fetches)."""
    async def send_letters(letters) -> None:
        raise AssertionError("no letters here")

    connection = Connection.from_settings(Settings(), "127.0.0.1:9")
    app = GencoApp("selector", connection, Topics(), send_letters, asyncio.Event(), fetch_wait_ms=10,
                   max_poll_records=512)
    app.topics.add(app.topic(REQUESTS.topic))
    asyncio.run(app.topics._update_indices())  # the conductor's subscription step
    app.consumer.resume_flow()
    app.flow_control.resume()
    return app


def handed_on(app: GencoApp, offset: int, generation: int | None = None) -> Message:
    """A request fetched at ``offset`` and handed on to the agent, as Faust tracks it."""
    message = Message(REQUESTS.topic, REQUESTS.partition, offset, 0.0, 0, None, b"r", b"{}", None, tp=REQUESTS,
                      generation_id=app.consumer_generation_id if generation is None else generation)
    app.consumer.track_message(message)
    return message


def committable(app: GencoApp) -> int | None:
    """The offset Faust would commit for the partition now (None: nothing)."""
    return app.consumer._new_offset(REQUESTS)


def test_acknowledged_events_are_committed_in_order_while_the_flow_runs():
    app = selector_app()
    messages = [handed_on(app, offset) for offset in range(3)]
    for message in messages:
        assert app.consumer.ack(message)
    assert committable(app) == 3
    assert not app.consumer.unacked


def test_an_acknowledgement_during_a_rebalance_marks_the_event_done_but_is_never_committed():
    """At a revocation Faust forgets the partition's committed offset and stops the flow; its stream then
    acknowledges events it skips. Counted, offset 7 would be committed with 5 and 6 never handed on."""
    app = selector_app()
    skipped = handed_on(app, 7)
    app.consumer.stop_flow()
    app.flow_control.suspend()
    assert not app.consumer.ack(skipped)
    assert skipped.acked and not app.consumer.unacked, "the rebalance must not wait for it"
    assert committable(app) is None


def test_an_event_of_an_earlier_generation_is_never_committed():
    app = selector_app()
    app.consumer_generation_id = 4
    stale = handed_on(app, 9, generation=3)
    assert not app.consumer.ack(stale)
    assert committable(app) is None
    fresh = handed_on(app, 0)
    assert app.consumer.ack(fresh)
    assert committable(app) == 1
