"""Benchmarks of the Sparse Flows engine against dense and sparse peers."""
