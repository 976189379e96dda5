"""Robustness corpus of vibrational EELS spectra made without the simulator's code (see generator.py)."""
