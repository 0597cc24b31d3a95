"""Image quality metrics of `pid-jax eval`: LPIPS (JAX, shipped weights), NIQE, colour error, blockiness."""
