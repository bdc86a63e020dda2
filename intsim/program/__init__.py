"""The integer program: the file format shared by calibration, the reference models and the engine."""
from .format import DEFAULT_SETTINGS, FORMAT, VERSION, Program, ProgramError, load, save, validate

__all__ = ["DEFAULT_SETTINGS", "FORMAT", "VERSION", "Program", "ProgramError", "load", "save", "validate"]
