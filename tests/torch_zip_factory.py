"""Test-side name for the torch zip writer, which lives in the package (`pid_jax.convert.torch_save`)."""

from pid_jax.convert.torch_save import (  # noqa: F401  (re-exported for the tests)
    STORAGE_NAMES,
    Build,
    Global,
    ODict,
    PersId,
    Raw,
    Reduce,
    StackGlobal,
    Storage,
    View,
    dumps,
    member_data_offset,
    save_state_dict,
    write_checkpoint,
    write_zip,
)
