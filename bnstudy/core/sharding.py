"""A pack's model axis over several local devices: a 1-D mesh, the state and hparams split along it.

Every leaf of a pack's TrainState and HParams has the pack's K models on its leading axis, and no
computation mixes models, so splitting that axis over N devices (K a multiple of N) runs the same
compiled program SPMD with no collective in the training step; the data is replicated. The training
programs go through `per_device` (shard_map): each device runs exactly the one-device program on its
own K/N models, rather than whatever the automatic partitioner makes of the vmapped program.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

P = PartitionSpec

MODEL_AXIS = "models"


def resolve_devices(devices: int | str) -> int:
    """`train.devices` as a number: "auto" = every local device on an accelerator, 1 on CPU (where extra
    devices are host-platform fakes sharing the same cores); an int is checked against what is there."""
    available = jax.local_device_count()
    if devices == "auto":
        return 1 if jax.default_backend() == "cpu" else available
    if not 1 <= int(devices) <= available:
        raise ValueError(f"train.devices={devices} but this process sees {available} {jax.default_backend()} device(s)")
    return int(devices)


def pack_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh named `models` over the first `num_devices` local devices."""
    return Mesh(jax.local_devices()[:num_devices], (MODEL_AXIS,))


def multiple_of(pack_size: int, num_devices: int) -> int:
    """The smallest multiple of `num_devices` holding `pack_size` models (a pack is padded up to it)."""
    return -(-pack_size // num_devices) * num_devices


def split_models(tree, mesh: Mesh | None):
    """Each leaf's leading (model) axis split over the mesh; unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(MODEL_AXIS)))


def replicate(tree, mesh: Mesh | None):
    """Every leaf whole on each device of the mesh; unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def per_device(fn, mesh: Mesh | None, in_models: tuple[bool, ...], out_specs):
    """`fn` run on each device's slice of the models (shard_map): argument i is split along its leading
    axis when `in_models[i]`, else replicated; `out_specs` are PartitionSpecs of the outputs (P(MODEL_AXIS)
    for [K, ...] leaves). Unchanged without a mesh."""
    if mesh is None:
        return fn
    specs = tuple(PartitionSpec(MODEL_AXIS) if split else PartitionSpec() for split in in_models)
    # check_vma off: the probe's lax.cond pairs a per-device branch with a constant NaN one, whose
    # replication types differ although both are [K/N] per device.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
