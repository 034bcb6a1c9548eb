"""Experiments: the end-to-end command line, sweeps and plots."""
