"""Lowest layer: pathologies, geometry, object-storage I/O and small shared mechanisms (no torch, no Ray)."""

__version__ = "0.1.0"
