"""How many models one compiled program holds: 1 on CPU, on an accelerator as many as fit in memory.

On CPU, vmapped convs run slower per model than one model at a time, so packing does not pay. On an
accelerator, the memory of one model's compiled step is measured and a pack is sized to a fraction
of the device memory, capped at `ACCELERATOR_PACK_CAP`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from bnstudy.core.engine import HParams
from bnstudy.core.trainer import PackTrainer

log = logging.getLogger("bnstudy")

# Upper bound on models per program on an accelerator; beyond it the returns are small and a
# failure costs more runs. Memory, measured per model, usually binds first for VGG.
ACCELERATOR_PACK_CAP = 256
# Fraction of device memory a pack may plan to use (the rest: data, eval buffers, fragmentation).
PACK_MEMORY_FRACTION = 0.5


def resolve_pack_size(pack_size: int | str, num_runs: int, trainer: PackTrainer | None = None) -> int:
    """`pack_size` (an int, or "auto") as a number of models in 1..num_runs."""
    if pack_size == "auto":
        if jax.default_backend() == "cpu":
            pack_size = 1
        else:
            pack_size = models_fitting_in_memory(trainer) if trainer else ACCELERATOR_PACK_CAP
    return max(1, min(int(pack_size), num_runs))


def models_fitting_in_memory(trainer: PackTrainer) -> int:
    """Models whose training step fits in `PACK_MEMORY_FRACTION` of the first device's memory."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return ACCELERATOR_PACK_CAP
    one = HParams.stack([{f: 0 for f in HParams._fields}])
    programs = trainer.programs
    state = jax.eval_shape(programs.init, one)
    perm = jax.ShapeDtypeStruct((1, trainer.num_train), jnp.int32)
    memory = programs.step.lower(state, one, trainer.data, perm, jnp.int32(0)).compile().memory_analysis()
    data_bytes = sum(a.nbytes for a in jax.tree.leaves(trainer.data))  # optional splits are None
    per_model = memory.temp_size_in_bytes + max(memory.argument_size_in_bytes - data_bytes, 0)
    fitting = int(PACK_MEMORY_FRACTION * (limit - data_bytes) // max(per_model, 1))
    log.info(
        "pack_size=auto: %.0f MB per model, %d fit in %.0f%% of device memory",
        per_model / 2**20,
        fitting,
        100 * PACK_MEMORY_FRACTION,
    )
    return max(1, min(fitting, ACCELERATOR_PACK_CAP))
