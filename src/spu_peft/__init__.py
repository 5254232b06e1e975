"""Selective Parameter Update (SPU) as a PEFT method."""

__version__ = "0.1.0"
