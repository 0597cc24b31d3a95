"""pid-jax: JAX/Flax NNX port of NVIDIA's PiD pixel-diffusion decoder."""

from pid_jax.errors import CheckpointError, ConfigError, InputError, PidError

__all__ = ["CheckpointError", "ConfigError", "InputError", "PidError"]
__version__ = "0.1.0"
