"""Persistence. The ONLY package that imports sqlalchemy or psycopg."""

from vectorlay.server.store.engine import Store, open_store

__all__ = ["Store", "open_store"]
