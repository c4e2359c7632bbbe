"""`llamapool bench`: throughput, latency and overload behaviour of the pool against baselines."""
