"""Checkpoints and the run directory: one atomic write for every file, the checkpoint store
with its single-file and sharded formats, and the run directory's files. Knows nothing of
models or ranks beyond what it is handed."""
