"""What the tests share: fakes, clocks, waits, servers and scenarios. Test modules import from here, never
from one another; conftest.py files hold only fixtures, hooks and setup."""
