"""replicator: PostgreSQL-native catalog replication from HQ to branches."""

__version__ = "0.1.0"
