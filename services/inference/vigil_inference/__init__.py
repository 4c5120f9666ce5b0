"""vigil_inference service."""
