"""pacegate: a zero-trust pipeline for a mixed fleet of connected pacemakers.

This is the shared package: wire formats, crypto recipes, config loading, PKI, the
embedded broker's plugins and the command line. The components (``device_sim``,
``gateway``, ``hospital``, ``cloud``) import it and never import each other.
"""

__version__ = "0.1.0"
