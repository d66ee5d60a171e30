"""Peer methods that the benchmarks run beside unet3d, each in the peer environment (.venv-bench)."""
