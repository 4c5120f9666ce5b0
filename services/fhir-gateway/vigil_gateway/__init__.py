"""vigil_gateway service."""
