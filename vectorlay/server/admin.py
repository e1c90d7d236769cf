"""Admin operations: what callers of the API change (clusters, endpoint keys, secrets, node flags),
each decided under the writer's lock and committed with its audit record in one transaction."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace

from vectorlay.core import cluster_health
from vectorlay.core.api import ClusterChange
from vectorlay.core.model import ClusterSpec, split_key, template_revision
from vectorlay.core.spec_diff import spec_changes
from vectorlay.core.tokens import hash_api_key
from vectorlay.errors import ConflictError, NotFoundError, UserError
from vectorlay.server.fleet import Fleet
from vectorlay.server.ids import random_id
from vectorlay.server.records import (
    ApiKeyRecord,
    AuditRecord,
    ClusterRecord,
    EventRecord,
    NodeRecord,
    RevisionRecord,
    SecretRecord,
)
from vectorlay.server.rollout import pick_revision
from vectorlay.server.secrets_box import SecretBox
from vectorlay.server.signals import Signals
from vectorlay.server.store import ops
from vectorlay.server.writer import Writer
from vectorlay.wire import CLOSE_POLICY

MAX_AUDIT_DETAIL = 4000  # characters of a change's field lines kept in its audit record


class Admin:
    def __init__(self, writer: Writer, signals: Signals, secret_box: SecretBox) -> None:
        self.writer = writer
        self.fleet: Fleet = writer.fleet
        self.signals = signals
        self.secret_box = secret_box

    # --- clusters -------------------------------------------------------------------------------

    def diff(self, specs: Sequence[ClusterSpec]) -> list[ClusterChange]:
        changes = []
        for spec in specs:
            old = self.fleet.clusters.get(spec.key)
            if old is None:
                changes.append(ClusterChange(spec.key, "created", f"{spec.replicas} replica(s)"))
            elif old.spec == spec:
                changes.append(ClusterChange(spec.key, "unchanged"))
            else:
                changes.append(ClusterChange(spec.key, "updated", describe_update(old.spec, spec),
                                             tuple(spec_changes(old.spec, spec))))
        return changes

    async def apply(self, specs: Sequence[ClusterSpec], dry_run: bool, actor: str = "",
                    rollback_to: int | None = None) -> list[ClusterChange]:
        """Store the clusters as specified, each changed one with a new revision of its spec. A
        changed manifest starts its cluster's failure history over (the change may be the fix),
        quarantine included. `rollback_to`: the specs are revision N's, applied again (undo)."""
        async with self.writer.lock:
            for spec in specs:
                for env, secret in spec.env_from_secret.items():
                    if (spec.project, secret) not in self.fleet.secrets:
                        raise UserError(
                            f"cluster {spec.name!r}: {env} needs secret {secret!r}, which project {spec.project!r} "
                            f"does not have (create it: vectorlay secret set {spec.project} {secret})")
            changes = self.diff(specs)
            if dry_run:
                return changes
            batch = self.writer.batch()
            for spec, change in zip(specs, changes, strict=True):
                if change.action == "unchanged":
                    continue
                old = self.fleet.clusters.get(spec.key)
                batch.put_cluster(ClusterRecord(spec, old.created_at if old else batch.wall, batch.wall))
                batch.set_health(spec.key, cluster_health.HEALTHY)
                self.fleet.avoid.pop(spec.key, None)
                note = f"rollback to revision {rollback_to}" if rollback_to is not None else ""
                detail = "; ".join(filter(None, (note, change.detail, *change.fields)))[:MAX_AUDIT_DETAIL]
                action = "rollback" if rollback_to is not None else change.action
                batch.audit(actor, f"cluster.{action}", spec.key, spec.project, detail)
                batch.revision(spec, actor, detail)
            await self.writer.commit(batch)
            return changes

    async def revisions(self, cluster: str) -> list[RevisionRecord]:
        return await self.writer.store.revisions(cluster)

    async def rollback(self, cluster: str, to_revision: int | None, actor: str = "") -> tuple[int, ClusterChange]:
        """Apply a stored revision's spec again (default: the one before the newest), through
        `apply`: audited, stored as a new revision, rolled like any change of the spec."""
        target = pick_revision(split_key(cluster)[0], await self.revisions(cluster), to_revision)
        changes = await self.apply([target.spec], False, actor, rollback_to=target.revision)
        return target.revision, changes[0]

    async def delete(self, name: str, actor: str = "") -> bool:
        async with self.writer.transaction() as batch:
            record = self.fleet.clusters.get(name)
            if record is None:
                return False
            batch.delete_cluster(name)
            batch.audit(actor, "cluster.delete", name, record.spec.project)
            return True

    async def unquarantine(self, name: str, actor: str = "") -> bool:
        """Lift a cluster's quarantine (and forget its failures); False if it was not quarantined."""
        async with self.writer.transaction() as batch:
            record = self.fleet.clusters.get(name)
            if record is None:
                raise NotFoundError(f"cluster {name!r} not found")
            current = self.fleet.health.get(name, cluster_health.HEALTHY)
            if not current.quarantined:
                return False
            batch.set_health(name, cluster_health.lift_quarantine(current))
            batch.event(name, "quarantine lifted")
            batch.audit(actor, "cluster.unquarantine", name, record.spec.project)
            batch.reconcile(name)
            return True

    # --- endpoint API keys ----------------------------------------------------------------------

    async def create_api_key(self, cluster: str, name: str, actor: str = "") -> tuple[ApiKeyRecord, str]:
        """A new key for the cluster's endpoint; the key itself is returned once, never stored."""
        async with self.writer.transaction() as batch:
            owner = self.fleet.clusters.get(cluster)
            if owner is None:
                raise NotFoundError(f"cluster {cluster!r} not found")
            key_id = f"vk-{random_id(8)}"
            key = f"{key_id}.{secrets.token_urlsafe(32)}"
            record = ApiKeyRecord(key_id, cluster, name or key_id, hash_api_key(key), batch.wall)
            batch.put_api_key(record)
            batch.event(cluster, f"API key {record.id} ({record.name}) created")
            batch.audit(actor, "key.create", f"{cluster}/{record.id}", owner.spec.project, record.name)
        return record, key

    async def revoke_api_key(self, cluster: str, key_id: str, actor: str = "") -> ApiKeyRecord:
        async with self.writer.transaction() as batch:
            record = self.fleet.api_keys.get(key_id)
            if record is None or record.cluster != cluster:
                raise NotFoundError(f"no API key {key_id!r} for cluster {cluster!r}")
            if record.revoked_at is None:
                record = replace(record, revoked_at=batch.wall)
                batch.put_api_key(record)  # proxies drop the key within one push
                batch.event(cluster, f"API key {record.id} ({record.name}) revoked")
                batch.audit(actor, "key.revoke", f"{cluster}/{record.id}", split_key(cluster)[1])
            return record

    # --- secrets --------------------------------------------------------------------------------

    async def set_secret(self, project: str, name: str, value: str, actor: str = "") -> bool:
        """Store (encrypted) or replace a project's secret; True if it existed before. Replicas
        using it get the new value when they next start."""
        ciphertext = self.secret_box.encrypt(value)
        async with self.writer.transaction() as batch:
            existed = (project, name) in self.fleet.secrets
            batch.put_secret(SecretRecord(project, name, ciphertext, batch.wall))
            batch.audit(actor, "secret.update" if existed else "secret.create", f"{project}/{name}", project)
            return existed

    async def delete_secret(self, project: str, name: str, actor: str = "") -> None:
        async with self.writer.transaction() as batch:
            if (project, name) not in self.fleet.secrets:
                raise NotFoundError(f"secret {name!r} not found in project {project!r}")
            users = sorted(r.spec.name for r in self.fleet.clusters.values()
                           if r.spec.project == project and name in r.spec.env_from_secret.values())
            if users:
                raise ConflictError(f"secret {name!r} is used by cluster(s) {', '.join(users)}")
            batch.delete_secret(project, name)
            batch.audit(actor, "secret.delete", f"{project}/{name}", project)

    # --- nodes ----------------------------------------------------------------------------------

    def node_by_name(self, name: str) -> NodeRecord:
        node_id = self.fleet.node_ids_by_name.get(name)
        if node_id is None:
            raise NotFoundError(f"node {name!r} not found")
        return self.fleet.nodes[node_id]

    async def set_node_flags(self, name: str, schedulable: bool, draining: bool, actor: str = "") -> NodeRecord:
        """Cordon (no new replicas), drain (also move the ones it has) or undo both."""
        async with self.writer.transaction() as batch:
            record = replace(self.node_by_name(name), schedulable=schedulable, draining=draining)
            action = "node.drain" if draining else ("node.uncordon" if schedulable else "node.cordon")
            batch.put_node(record, "flags")
            batch.audit(actor, action, name)
            for cluster in self.fleet.clusters_on_node(record.id):
                batch.reconcile(cluster)
            if schedulable:
                for cluster in self.fleet.clusters_waiting() | self.fleet.clusters_to_spread():
                    batch.reconcile(cluster)
            return record

    async def remove_node(self, name: str, actor: str = "") -> int:
        """Forget a node: its replicas count as lost at once and are replaced elsewhere; its
        credential stops working and its link is closed with the reason."""
        async with self.writer.transaction() as batch:
            record = self.node_by_name(name)
            replicas = self.fleet.replicas_on_node(record.id)
            for replica in replicas:
                batch.forget(replica.id)
                batch.reconcile(replica.cluster)
            batch.remove_node(record.id)
            batch.audit(actor, "node.rm", name, detail=f"{len(replicas)} replica(s) lost")
            for cluster in self.fleet.clusters_waiting():
                batch.reconcile(cluster)
        self.writer.sessions.close(record.id, "this node was removed from the fleet", CLOSE_POLICY)
        return len(replicas)

    async def add_node(self, record: NodeRecord, actor: str = "") -> None:
        async with self.writer.transaction() as batch:
            batch.put_node(record)
            batch.audit(actor, "node.join", record.name, detail=", ".join(g.name for g in record.gpus) or "no GPU")

    # --- reading what is stored -----------------------------------------------------------------

    async def events(self, cluster: str, limit: int) -> list[EventRecord]:
        return await self.writer.store.events(cluster, limit)

    async def audit_log(self, limit: int, project: str | None) -> list[AuditRecord]:
        return await self.writer.store.audit(limit, project)

    async def node_changes(self, name: str, limit: int) -> list[AuditRecord]:
        """Who joined, cordoned, drained or removed the node `name` (cluster records may share
        a target name: only `node.*` actions)."""
        return await self.writer.store.audit(limit, target=name, action_prefix="node.")

    def audit_op(self, actor: str, action: str, target: str, project: str = "", detail: str = "") -> ops.AddAudit:
        """An audit record for a change stored elsewhere (tokens live in the authenticator)."""
        return ops.AddAudit(AuditRecord(self.writer.wall_clock(), actor or "server", action, target, project, detail))


def describe_update(old: ClusterSpec, new: ClusterSpec) -> str:
    """The gist of a change: whether its replicas are replaced (the field lines say the rest)."""
    if template_revision(old) != template_revision(new):
        return "rolling replacement"
    parts = []
    if old.replicas != new.replicas:
        parts.append(f"replicas {old.replicas} → {new.replicas}")
    parts.append("no replica restarts")
    return "; ".join(parts)
