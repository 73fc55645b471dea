"""Runnable examples: configs and the factories they name (``examples.<example>.<module>:<fn>``)."""
