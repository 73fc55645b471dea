"""The training loop: the Trainer (fit, train_step, evaluate), its callbacks, progress and
loss state, loaders, validation metrics, early stopping, the health check, resuming and RNG
streams."""
