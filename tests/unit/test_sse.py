"""The one SSE framer and splitter (cluster/sse.py), on hostile byte streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import sse

EVENTS = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), min_size=1),
    max_size=8,
)  # payloads are JSON text: no raw line breaks, no lone surrogates (not UTF-8)


@given(EVENTS, st.lists(st.integers(min_value=1, max_value=7), min_size=1))
def test_events_split_the_same_however_the_bytes_arrive(payloads, cuts):
    wire = "".join(sse.frame(p) for p in payloads).encode() + sse.DONE.encode()
    splitter, got, i, k = sse.EventSplitter(1 << 20), [], 0, 0
    while i < len(wire):
        step = cuts[k % len(cuts)]
        got += splitter.feed(wire[i : i + step])
        i, k = i + step, k + 1
    splitter.close()
    assert [sse.payload(e) for e in got[:-1]] == payloads and sse.is_done(got[-1])


def test_an_oversized_event_and_a_cut_stream_are_refused():
    splitter = sse.EventSplitter(64)
    with pytest.raises(ValueError, match="larger than 64"):
        for _ in range(10):
            splitter.feed(b"data: " + b"x" * 16)
    cut = sse.EventSplitter(64)
    assert cut.feed(b"data: {}\n\ndata: {") == ["data: {}\n\n"]
    with pytest.raises(ValueError, match="inside an event"):
        cut.close()


def test_frame_and_payload_are_inverse():
    event = sse.frame('{"a":1}')
    assert event == 'data: {"a":1}\n\n' and sse.is_event(event) and sse.payload(event) == '{"a":1}'
    assert not sse.is_done(event) and sse.is_done(sse.DONE) and not sse.is_event('{"a":1}')
