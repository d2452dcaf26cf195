"""Helpers every part of the package shares, each written once: argument checks, thread control, progress bars."""
