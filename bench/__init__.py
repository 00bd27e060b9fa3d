"""Benchmarks: `python -m bench.serve` compares our server with Hugging Face generate."""
