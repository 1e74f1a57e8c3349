"""Generation: token ids → typed events. `events` and `budget` are MLX-free; the rest uses MLX."""
