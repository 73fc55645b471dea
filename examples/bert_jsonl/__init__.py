"""A Hugging Face BERT sequence classifier on a local JSON Lines file read with ``datasets``."""
