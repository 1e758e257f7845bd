"""The one error of starting a network or a node: a part did not start, and the message says what to do
(deploy/cli.py prints it as it is)."""

from __future__ import annotations


class NetworkStartError(RuntimeError):
    """A part of the network (or an operator's node) did not start; the message says what to do next."""
