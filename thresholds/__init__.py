"""Activation-threshold schedules and the algorithms that choose them."""
