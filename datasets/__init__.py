"""Built-in dataset plugins (installed as ``czsl_bench.datasets``)."""
