"""Corral: open-source IoT fleet management."""

__version__ = "0.1.0"
