"""A custom ``train.step_fn``: an InfoNCE loss over two augmented views of each sample."""
