"""SENECA-like event-driven neuromorphic processor: architecture, energy table and simulators."""
