"""czsl-bench: one harness, one evaluator and a plugin registry for Compositional Zero-Shot Learning.

Importing this package is cheap (no torch); heavy modules load when first used.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `czsl_bench.run(...)` without importing torch at `import czsl_bench` time.
    if name == "run":
        from czsl_bench.api import run

        return run
    raise AttributeError(f"module 'czsl_bench' has no attribute {name!r}")


__all__ = ["__version__", "run"]
