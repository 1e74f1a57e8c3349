"""Model architectures in MLX, one file each, with shared layers and caches beside them.

`config` is MLX-free; every other module here imports MLX.
"""
