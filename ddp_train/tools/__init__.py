"""Everything built on the Trainer's public API, one subcommand each: train, plot, sweep,
lr-find, cv, export, serve, convert. Nothing below this layer imports it."""
