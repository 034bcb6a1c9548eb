"""SENECA-like event-driven neuromorphic processor: architecture, energy table and simulators."""
from seneca_sim.arch import Arch, ArchError, energy_per_sop, load_arch
from seneca_sim.counting import simulate

__all__ = ["Arch", "ArchError", "energy_per_sop", "load_arch", "simulate"]
