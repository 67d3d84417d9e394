"""Sparsity as data, at the bottom of the package: the patterns (unstructured, N:M, HxW blocks) and their pure
mask functions, the keep-mask encoding, the measured sparsity of a model, and the one count of weights that
break a keep-mask. Everything above (pruning, the on-disk contract, recovery, export) reads patterns and masks
from here; nothing here imports them."""
