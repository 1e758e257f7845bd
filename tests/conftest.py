"""Setup for every test: the helpers in tests/support assert too (scenarios, checks of an answer), so
pytest rewrites their asserts to show the values that failed, as it does in test modules.

`make test` runs the suite in two pytest-xdist lanes (`-n 2 --dist loadgroup`). Every engine runs on
one thread (OMP_NUM_THREADS=1), so most of a network's time is one core busy and one idle; two lanes,
each with one network at a time, use both. The lanes are balanced by measured time (a serial run's
`--durations`, benchmarks/RESULTS.md "the test suite"): lane A takes the two package networks (the
cheater's and the network package's, never at the same time: together they would hold a dozen
engines) and the scoring reference; lane B the unit tests first, then the README, existing-cluster,
settlement and the other integration modules. Each lane runs in collection order."""

import pytest

pytest.register_assert_rewrite("tests.support")

LANE_A = (
    "tests/integration/cheater/",
    "tests/integration/network/",
    "tests/integration/test_scoring_reference.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        lane = "lane-a" if item.nodeid.startswith(LANE_A) else "lane-b"
        item.add_marker(pytest.mark.xdist_group(lane))
