"""Capture, unlearning engine, influence, evaluation and the command line."""
