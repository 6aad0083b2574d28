"""The Python package both sides of vdm-hub use: settings, wire schema, Redis keys and scripts."""

__version__ = "0.1.0"
