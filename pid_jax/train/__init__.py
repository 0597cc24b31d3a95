"""Training PiD networks in JAX: upstream's losses, optimizer and EMA as pure functions.

- `config.TrainConfig`: hyper-parameters (`TrainConfig.for_stage("teacher" | "full", **overrides)`).
- `state.TrainState`, `init_train_state`, `merged_model`: the state pytree and the model out of it.
- `step.train_step(graphdef, tcfg, state, batch)`: one jit-able step; `loss_and_grads` / `apply_grads`
  with explicit draws (`noising.Draws`) for replays.
- `init.init_like_upstream`, `init.load_init`: upstream's initialisation, strict init checkpoints.
- `noising`, `resize`, `losses`, `optim`, `ema`, `stages`: the pieces; `parity`: replay of upstream runs.
- `distill/`: upstream's DMD2 distillation (stage C) in the same shape: config, discriminator, losses, state, step,
  the loop stage, its parity replay and benchmark.
"""

from pid_jax.train.config import TrainConfig
from pid_jax.train.state import TrainState, init_train_state, merged_model
from pid_jax.train.step import apply_grads, loss_and_grads, train_step

__all__ = [
    "TrainConfig",
    "TrainState",
    "apply_grads",
    "init_train_state",
    "loss_and_grads",
    "merged_model",
    "train_step",
]
