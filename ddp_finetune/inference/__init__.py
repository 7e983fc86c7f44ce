"""After training: evaluate, predict (and export) a saved model folder."""
