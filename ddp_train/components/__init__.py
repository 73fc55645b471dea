"""The parts of a run, built from the config: registries of models, data sets, losses,
optimizers and schedules; weight init and norm; and the builder the trainer, export and
cross-validation share."""
