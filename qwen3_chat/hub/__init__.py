"""Models by name: the `models.toml` registry and verified Hugging Face downloads. No MLX."""
