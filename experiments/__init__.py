"""Experiment configs and the runner that compares simulated and live runs."""
