"""The version of ddp_train (recorded in every run's config.yaml and export manifest)."""

__version__ = "0.1.0"
