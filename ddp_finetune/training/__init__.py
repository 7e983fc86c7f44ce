"""One training run: built objects (run.py), the loop (loop.py), checkpoints, guards, schedules, groups."""
