"""Compiler: model + threshold schedule + architecture -> per-core program.

``compile(model, arch, schedule)`` -> :class:`Program` (plain frozen data: tiles of every weight
matrix on cores, placement on a mesh of chips, multicast routes, element-wise work and memory per
core). ``python -m compiler rwkv_430m --arch seneca.toml`` prints a mapping summary.
"""
from compiler.program import ZOO_SHAPES, CompileError, Program, ProgramError, Table, compile, model_shape

__all__ = ["compile", "Program", "ProgramError", "CompileError", "Table", "model_shape", "ZOO_SHAPES"]
