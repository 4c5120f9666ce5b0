"""vigil_ingest service."""
