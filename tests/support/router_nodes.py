"""Node snapshots for the router's tests: `node(id, **fields)` with serving defaults, and `snapshots`,
a hypothesis strategy of arbitrary ones (some banned until after NOW, some below any quality floor)."""

from __future__ import annotations

from hypothesis import strategies as st

from routing.router import NodeSnapshot

NOW = 10_000.0  # the router's clock in these tests


def node(i, **kw):
    kw.setdefault("model_id", "m")
    kw.setdefault("capacity", 8)
    kw.setdefault("ttft_ewma_s", 0.1)
    kw.setdefault("tpot_ewma_s", 0.01)
    return NodeSnapshot(node_id=i, **kw)


snapshots = st.builds(
    NodeSnapshot,
    node_id=st.sampled_from([f"n{i}" for i in range(12)]),
    model_id=st.sampled_from(["m", "other"]),
    capacity=st.integers(1, 64),
    live=st.booleans(),
    in_flight=st.integers(0, 100),
    queue_depth=st.integers(0, 10),
    ttft_ewma_s=st.none() | st.floats(0, 30),
    tpot_ewma_s=st.none() | st.floats(0, 1),
    error_streak=st.integers(0, 5),
    banned_until=st.sampled_from([0.0, NOW - 1, NOW + 5]),
    last_failure_at=st.none() | st.floats(0, NOW),
    quality=st.none() | st.floats(0, 1),
    joined_at=st.floats(0, NOW),
)
