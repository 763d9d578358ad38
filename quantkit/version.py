"""The quantkit version, in one place (read by the package, run folders and engine metadata)."""

__version__ = "0.1.0"
