"""The GPU run of issue #15: llamapool against llama-server on one lent GPU (see run.sh)."""
