"""GPU plumbing shared by several backends: routing alignment (pairs grouped by expert, padded to a row
tile), the weighted combine, the launcher and chained launches. Backends import these; no backend
imports another backend.

Importing this package imports nothing heavy: the Triton kernels (``_*.py``) load when first launched.
"""
