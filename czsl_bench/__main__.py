"""``python -m czsl_bench ...`` is ``czsl-bench ...``; torchrun needs it:
``torchrun --nproc-per-node N -m czsl_bench run METHOD --dataset D`` (docs/distributed.md)."""

from czsl_bench.cli import main

if __name__ == "__main__":
    main()
