"""Nion Swift plug-in: Tilt Series and Vibrational EELS panels and their acquisition procedures."""


def run() -> None:
    """Entry point called by Nion Swift's plug-in manager."""
