"""Built-in method plugins (installed as ``czsl_bench.methods``): one file per method."""
