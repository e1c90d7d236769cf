"""Fault points for fault-injection tests of the agent (`VECTORLAY_NODE_FAULTS`); never set in production.

The server's crash points kill it as kill -9 would. The agent's raise an exception instead: they
stand for a bug, to test what an agent dying of one does to the fleet (it must not say it is
restarting on purpose, so the server takes the node out of routing at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vectorlay.errors import UserError

log = logging.getLogger("vectorlay.node")

ENV_VAR = "VECTORLAY_NODE_FAULTS"
POISON_ENV = "POISON_PILL_FOR_TESTS"
# Each point, and where it is.
POINTS = {
    "converge": "the supervisor's loop, when it converges on a desired set that is not empty",
    "poison": f"the supervisor's loop, when a desired replica's env has {POISON_ENV} (a workload that kills "
              "whichever agent runs it, for the server's quarantine)",
}


class InjectedFault(Exception):
    """Raised at a fault point; deliberately not a VectorlayError, as an unexpected bug is not."""


@dataclass(frozen=True)
class FaultPoints:
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> FaultPoints:
        """`converge` or `a,b`: the points named; an unknown name is a mistake in the test."""
        names = frozenset(name.strip() for name in text.split(",") if name.strip())
        unknown = sorted(names - POINTS.keys())
        if unknown:
            raise UserError(f"unknown {ENV_VAR} point(s) {', '.join(unknown)} (known: {', '.join(POINTS)})")
        return cls(names)

    def hit(self, name: str) -> None:
        if name in self.names:
            log.warning("fault point %r reached: raising", name)
            raise InjectedFault(f"fault point {name!r} reached")
