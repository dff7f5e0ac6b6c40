"""Experts backends: one module each, behind the contract in base.py. See docs/backends.md."""
