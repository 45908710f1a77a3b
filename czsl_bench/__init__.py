"""czsl-bench: one harness, one evaluator and a plugin registry for Compositional Zero-Shot Learning.

Importing this package is cheap (no torch); heavy modules load when first used.
"""

__version__ = "0.1.0"
