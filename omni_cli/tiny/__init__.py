"""Tiny random checkpoints in the released file formats, for tests and smoke runs."""
