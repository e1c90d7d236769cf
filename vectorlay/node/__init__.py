"""The node agent: joins, heartbeats, runs replicas, probes them and keeps their logs."""
