"""Training recipes: real models and data loaded offline, training loops, evaluation."""
