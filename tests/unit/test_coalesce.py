"""The node's stream coalescing: never waits, keeps order, passes errors through."""

import asyncio

import pytest

from cluster.deployment import StreamCount, coalesce_ready


async def _source(items, delay=0.0, fail=False):
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item
    if fail:
        raise RuntimeError("engine died")


async def _collect(stream, consumer_delay=0.0):
    out = []
    async for batch in stream:
        out.append(batch)
        if consumer_delay:
            await asyncio.sleep(consumer_delay)
    return out


def test_slow_producer_sends_every_chunk_alone():
    batches = asyncio.run(_collect(coalesce_ready(_source(range(5), delay=0.01))))
    assert batches == [[0], [1], [2], [3], [4]]


def test_slow_consumer_gets_waiting_chunks_together_in_order():
    batches = asyncio.run(_collect(coalesce_ready(_source(range(20), delay=0.001)), consumer_delay=0.02))
    assert [x for b in batches for x in b] == list(range(20))
    assert len(batches) < 20 and batches[0] == [0]  # the first chunk never waits for company


def test_errors_arrive_after_the_chunks_before_them():
    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for batch in coalesce_ready(_source([1, 2], fail=True)):
                got.extend(batch)
        return got

    assert asyncio.run(run()) == [1, 2]


def test_linger_groups_later_chunks_but_never_delays_the_first_two():
    """For chat the first chunk is only the role header: the first token (second chunk) must not wait."""
    batches = asyncio.run(_collect(coalesce_ready(_source(range(12), delay=0.005), linger_s=0.05)))
    assert batches[:2] == [[0], [1]]
    assert [x for b in batches for x in b] == list(range(12)) and len(batches) <= 5
    one = asyncio.run(_collect(coalesce_ready(_source(range(12), delay=0.005), linger_s=0.05, immediate=1)))
    assert one[0] == [0] and len(one[1]) > 1


def test_a_lone_stream_never_lingers_a_busy_replica_does():
    """Lingering saves hops only when many streams share the replica; alone, tokens must not clump."""
    lone = StreamCount(linger_from=2)
    batches = asyncio.run(
        _collect(coalesce_ready(_source(range(8), delay=0.005), linger_s=0.05, streams=lone))
    )
    assert batches == [[i] for i in range(8)] and lone.active == 0
    busy = StreamCount(linger_from=2)
    busy.active = 1  # another stream is being sent
    batches = asyncio.run(
        _collect(coalesce_ready(_source(range(8), delay=0.005), linger_s=0.05, streams=busy))
    )
    assert len(batches) < 8 and busy.active == 1
