"""SENECA-like event-driven neuromorphic processor: architecture, energy table and simulators."""
import importlib

_EXPORTS = {"Arch": "seneca_sim.arch", "ArchError": "seneca_sim.arch", "energy_per_sop": "seneca_sim.arch",
            "load_arch": "seneca_sim.arch", "simulate": "seneca_sim.counting"}


def __getattr__(name):  # lazy, so that ``python -m seneca_sim.arch`` runs without a runpy warning
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seneca_sim' has no attribute {name!r}")


__all__ = list(_EXPORTS)
