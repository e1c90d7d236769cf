"""Which stored revision `rollout undo` applies again: a pure choice over the cluster's history."""

from __future__ import annotations

from collections.abc import Sequence

from vectorlay.errors import UserError
from vectorlay.server.records import RevisionRecord


def pick_revision(name: str, revisions: Sequence[RevisionRecord], to_revision: int | None) -> RevisionRecord:
    """The revision to roll back to: `to_revision`, else the one before the newest (the newest
    is what runs now). `revisions` are oldest first. UserError, in one line, if there is none."""
    if to_revision is not None:
        found = next((r for r in revisions if r.revision == to_revision), None)
        if found is None:
            kept = (f"revisions {revisions[0].revision}-{revisions[-1].revision} are kept" if len(revisions) > 1
                    else f"revision {revisions[0].revision} is kept" if revisions else "no revision is kept")
            raise UserError(f"cluster {name!r} has no revision {to_revision} ({kept})")
        return found
    if len(revisions) < 2:
        raise UserError(f"cluster {name!r} has no earlier revision to roll back to"
                        + (f" (only revision {revisions[0].revision})" if revisions else ""))
    return revisions[-2]
