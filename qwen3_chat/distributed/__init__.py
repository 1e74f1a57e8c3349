"""Running one model across several processes or Macs on MLX's own distributed layer.

Pipeline parallel: each rank holds a contiguous run of layers; rank 0 embeds, samples and
drives the session, the others follow its commands (worker.py). MLX is imported only by the
modules that run the model (stage, pipeline, worker); hosts.py stays MLX-free.
"""
