"""Exception types. Every user-facing failure is one of these, so the CLI can print one line."""


class PidError(Exception):
    """Base class for pid-jax errors that the CLI reports as `error: ...`."""


class ConfigError(PidError, ValueError):
    """A preset or network configuration is invalid or unsupported."""


class CheckpointError(PidError, ValueError):
    """A checkpoint file is unreadable, hostile, corrupted or does not match the network."""


class InputError(PidError, ValueError):
    """A runtime input (latent, sigma, caption, step count, dtype) is invalid."""
