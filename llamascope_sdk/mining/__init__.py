"""Mining max-activating examples: the mining loop, its state, checkpoints and the
distributed merge."""
