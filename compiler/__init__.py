"""Compiler: model + threshold schedule + architecture -> per-core program."""
