"""Weights on disk: loading, quantizing, verifying and converting. `verify` is MLX-free."""
