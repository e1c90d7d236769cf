"""The edge proxy: routes each request by Host header to a ready replica, with failover."""
