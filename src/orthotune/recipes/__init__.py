"""Training recipes: real models and data loaded offline, one training loop, evaluation, plots."""
