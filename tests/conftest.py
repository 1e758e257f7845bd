"""Setup for every test: the helpers in tests/support assert too (scenarios, checks of an answer), so
pytest rewrites their asserts to show the values that failed, as it does in test modules."""

import pytest

pytest.register_assert_rewrite("tests.support")
