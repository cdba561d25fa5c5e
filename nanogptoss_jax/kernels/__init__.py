"""Fast paths beside the readable model: each equals a plain version in `model/` (tests check
values and gradients), and `model/choices.py` is the one place that picks between them.

Kernels import only JAX and the standard library, so they sit below every other layer.
"""
