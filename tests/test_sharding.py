"""A pack split over two devices trains exactly as on one: checked in a subprocess with two fake CPU devices
(XLA reads the device count once, before JAX starts, so it cannot be set inside this test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnstudy.core import sharding

REPO = Path(__file__).resolve().parents[1]

TWO_DEVICE_PACK = """
import json, jax, numpy as np
import conftest
from bnstudy.core import sharding
from bnstudy.core import trainer

assert jax.local_device_count() == 2, jax.devices()
data = conftest.make_arrays(n_train=128, n_test=64)
hp = conftest.hparams([dict(lr=lr, seed=s) for lr, s in [(0.05, 0), (0.1, 1), (0.02, 2), (0.2, 3)]])
run = lambda pack, **kw: pack.train(hp, lambda step, epoch, m: None, **kw)
flat = lambda state: [np.asarray(a, np.float64) for a in jax.tree.leaves(jax.device_get(state))]
out = {}
for loop in ("python", "scan"):
    schedule = conftest.schedule(epochs=1, max_steps_per_epoch=3, log_every=3, loop=loop, steps_per_call=2,
                                 probe_every=2, discrepancy=True, population_batches=1, discrepancy_train_subset=32)
    program = conftest.cnn_program()
    one = run(trainer.PackTrainer(program, data, schedule))
    split = trainer.PackTrainer(program, data, schedule, mesh=sharding.pack_mesh(2))
    restored = jax.device_put(split.programs.init(hp), jax.devices()[0])  # as a checkpoint arrives: one device
    two = run(split, state=restored)
    kernel = jax.tree.leaves(two.state.params)[0]
    out[loop] = dict(
        state_max_abs_diff=max(float(np.max(np.abs(a - b))) for a, b in zip(flat(one.state), flat(two.state))),
        final_rel_diff={k: float(np.nanmax(np.abs(one.final[k] - two.final[k]) / np.maximum(np.abs(one.final[k]), 1)))
                        for k in one.final},
        same_keys=sorted(one.final) == sorted(two.final),
        devices=len(kernel.sharding.device_set),
        replicated=bool(kernel.sharding.is_fully_replicated),
        shard_rows=sorted({s.data.shape[0] for s in kernel.addressable_shards}),
        test_acc=two.final["test/acc"].tolist(),
    )
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess compiling two packs per loop (python and scan loops, BN modes, probes): ~50 s on 2 cores
def test_a_pack_of_four_over_two_devices_equals_it_on_one_device():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_PACK], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT")[-1])
    for loop, r in out.items():
        # Each device runs the one-device program on its two models (shard_map); what may differ is XLA's
        # fusion for a pack of 2 vs 4: float32 round-off (measured: states within 2e-5 after 3 steps,
        # final metrics within 1e-6 relative).
        assert r["state_max_abs_diff"] < 1e-4, json.dumps(r)
        assert r["same_keys"], json.dumps(r)
        smooth = {k: d for k, d in r["final_rel_diff"].items() if k.startswith("smooth/")}
        assert smooth and max(smooth.values()) < 1e-4, json.dumps(r)  # finite differences amplify round-off
        assert max(d for k, d in r["final_rel_diff"].items() if k not in smooth) < 1e-5, json.dumps(r)
        assert r["devices"] == 2 and not r["replicated"] and r["shard_rows"] == [2], (loop, r)
        assert len(set(r["test_acc"])) > 1, "the four models should differ (different lr and seed)"


def test_pack_sizes_round_up_to_a_multiple_of_the_devices():
    assert [sharding.multiple_of(k, 2) for k in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 6]
    assert sharding.multiple_of(7, 1) == 7 and sharding.multiple_of(9, 8) == 16


def test_devices_resolve_to_one_on_cpu_and_refuse_more_than_there_are():
    import jax

    assert jax.default_backend() == "cpu"  # the test suite's own process
    assert sharding.resolve_devices("auto") == 1 and sharding.resolve_devices(1) == 1
    with pytest.raises(ValueError, match="train.devices=3"):
        sharding.resolve_devices(jax.local_device_count() + 2)
