"""pacegate: a zero-trust pipeline for a mixed fleet of connected pacemakers.

This is the shared core: wire formats, crypto recipes, the channel, the PKI library,
config loading and logging. It imports no component. The components (``device_sim``,
``broker``, ``gateway``, ``hospital``, ``cloud``) import it and never each other; the
operator layer (``console``: the command line, the stack, the demo) is the only code that
imports the components. ``docs/architecture.md`` draws the three layers.
"""

__version__ = "0.1.0"  # the one version source (pyproject.toml reads it)
