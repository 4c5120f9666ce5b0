"""Vigil shared package: codes, message contracts, settings and telemetry used by every service.

Nothing here connects to a server or reads settings at import time.
"""
__version__ = "0.1.0"
