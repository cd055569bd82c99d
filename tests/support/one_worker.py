"""The test suite's pytest-xdist schedule: every integration test on one worker, in collection
order; the unit tests on the other worker beside them (``make test`` runs ``-n 2``).

The integration tests share the session's servers (tests/integration/conftest.py), and some
restart or break a server or measure a burst: run on two workers they would start each session
server twice and overlap. So they form one work unit. Each unit test is a work unit of its own.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

SERVERS = "servers"  # the one work unit of the integration tests


def scope_of(nodeid: str) -> str:
    """The work unit of a test: ``SERVERS`` for tests/integration/, else the test itself."""
    return SERVERS if nodeid.replace("\\", "/").startswith("tests/integration/") else nodeid


class ServersOnOneWorker(LoadScopeScheduling):
    """xdist's scope scheduling with ``scope_of`` as the scope: the largest unit (the
    integration tests) goes to a worker first, and the unit tests fill the other."""

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)
