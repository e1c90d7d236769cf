"""Whether a replica serves, and whether a cluster is ready: decided here, once.

The route feed sends proxies only replicas that serve; `get clusters` counts them as ready; and
`apply` waits until every desired replica of the current revision serves. A replica serves when
it is ready, not being stopped, has an address to forward to, and its node is ready: a suspect
node's replicas leave routing at once (its link dropped or it went silent), so they are not
counted as ready either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vectorlay.core.model import NodeState, Replica, ReplicaState


def serves(replica: Replica, node_state: Callable[[str], NodeState]) -> bool:
    """Whether traffic may go to `replica`; `node_state` gives a node's current state by id."""
    return (
        replica.state is ReplicaState.READY
        and not replica.stopping
        and bool(replica.address)
        and replica.node_id is not None
        and node_state(replica.node_id) is NodeState.READY
    )


@dataclass(frozen=True)
class ClusterReadiness:
    desired: int
    serving: int  # replicas of the current revision that serve
    up_to_date: int  # live replicas of the current revision, serving or not
    live: int  # replicas not being stopped, of any revision

    @property
    def ready(self) -> bool:
        """All desired replicas of the current revision serve, and nothing else is left running."""
        return self.serving >= self.desired and self.live == self.desired


def cluster_readiness(desired: int, revision: str, replicas: Iterable[Replica],
                      node_state: Callable[[str], NodeState]) -> ClusterReadiness:
    """`replicas`: the cluster's, stopping or not; `revision`: that of its current spec."""
    live = [r for r in replicas if not r.stopping]
    current = [r for r in live if r.revision == revision]
    return ClusterReadiness(desired, sum(1 for r in current if serves(r, node_state)), len(current), len(live))
