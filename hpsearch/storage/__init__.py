"""The study's Optuna storage: backends, the trial book-keeping kept in it, liveness."""
