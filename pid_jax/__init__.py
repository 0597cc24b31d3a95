"""pid-jax: JAX/Flax NNX port of NVIDIA's PiD pixel-diffusion decoder."""

from pid_jax.errors import CheckpointError, ConfigError, InputError, PidError

__version__ = "0.1.0"

# Loaded on first use: keeps `import pid_jax.errors` (used by the converters) free of JAX.
_LAZY = {
    "PiDDecoder": "pid_jax.decoder",
    "decode": "pid_jax.decoder",
    "noise_latent": "pid_jax.sampler",
    "PiDUpscaler": "pid_jax.upscale",
    "PidNet": "pid_jax.modeling",
    "init_pidnet": "pid_jax.modeling",
    "load_model": "pid_jax.weights",
    "load_config": "pid_jax.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pid_jax' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "InputError", "PidError", *_LAZY]
