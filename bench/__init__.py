"""Load and benchmark tools; run from the repository root (`python -m bench.load`)."""
