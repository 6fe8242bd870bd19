"""The benchmark scripts: step_vs_torch's table arithmetic, common's helpers, and every script's
smallest run end to end (those that compile train programs are marked slow)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import step_vs_torch  # noqa: E402  (found on the path set just above)


def test_table_gives_ms_per_step_and_ratios_to_torch_and_to_the_lever_defaults():
    seconds = {
        "bnstudy app, steps_per_call=1": [0.5, 0.4, 0.6],  # median 0.5 s over 10 steps: 50 ms
        "bnstudy app, steps_per_call=4": [0.2, 0.3, 0.25],
        "PyTorch eager (torch_reference.py)": [0.75, 0.7, 0.8],
        "lever: defaults": [0.3, 0.3, 0.3],
        "lever: nn.max_pool (select_and_scatter)": [0.6, 0.6, 0.6],
    }
    rows = {r["variant"]: r for r in step_vs_torch.table(seconds, steps=10, auto_k=4)}
    one, auto = rows["bnstudy app, steps_per_call=1"], rows["bnstudy app, steps_per_call=4 (auto)"]
    assert one["ms_per_step"] == pytest.approx(50.0) and auto["ms_per_step"] == pytest.approx(25.0)
    assert one["ratio"] == pytest.approx(75.0 / 50.0) and auto["ratio"] == pytest.approx(3.0)
    assert one["examples_per_s"] == pytest.approx(128 / 0.05)
    assert rows["lever: nn.max_pool (select_and_scatter)"]["ratio"] == pytest.approx(0.5)


def test_every_bnstudy_row_is_a_worker_spec_that_changes_one_setting_from_the_defaults():
    assert step_vs_torch.worker_spec(k="4") == "flags=on,malloc=on,pool=maxtree,bn=folded,conv=stencil,convs=chosen,k=4"
    specs = step_vs_torch.lever_specs(flags_measured=True)
    defaults = dict(kv.split("=") for kv in specs["defaults"].split(","))
    assert defaults["k"] == "auto"
    for name, spec in specs.items():
        changed = {k for k, v in (kv.split("=") for kv in spec.split(",")) if defaults[k] != v}
        assert len(changed) == (0 if name == "defaults" else 1), name


def test_each_xla_flag_has_a_lever_and_a_worker_without_it_sets_only_the_others(monkeypatch):
    from bnstudy.perf import xla_flags

    assert set(step_vs_torch.FLAG_LEVERS) == {xla_flags.flag_name(f) for f in xla_flags.CPU_FLAGS}
    monkeypatch.setattr(xla_flags, "speed_flags", lambda: xla_flags.CPU_FLAGS)
    for flag in xla_flags.CPU_FLAGS:  # monkeypatch restores this process's XLA_FLAGS afterwards
        monkeypatch.setenv("XLA_FLAGS", flag)  # set by hand: dropped as well
        step_vs_torch.set_process_settings(f"without:{xla_flags.flag_name(flag)}", malloc_on=False)
        assert os.environ["XLA_FLAGS"].split() == [f for f in xla_flags.CPU_FLAGS if f != flag]
    step_vs_torch.set_process_settings("off", malloc_on=False)
    assert os.environ["XLA_FLAGS"] == ""


def test_table_without_torch_has_no_ratio():
    rows = step_vs_torch.table({"bnstudy app, steps_per_call=1": [0.1]}, steps=2, auto_k=2)
    assert rows[0]["ratio"] is None and rows[0]["ms_per_step"] == pytest.approx(50.0)


def test_the_default_job_line_gives_its_overhead_inside_and_outside_the_process(capsys):
    buckets = dict(startup=2.0, data=0.1, compile=1.0, train_steps=10.0, evaluation=2.5)
    times = buckets | dict(logging=0.4, checkpoints=0.2, other=0.3, wall=16.5)
    summary = {"time_breakdown": times, "process_wall": 16.9, "steps": 168, "step_time": 0.0595}
    step_vs_torch.print_breakdown(summary)
    out = capsys.readouterr().out
    assert "not train steps 6.5 s in the process, 6.9 s from outside (spawn to exit: 16.9 s)" in out
    assert "25% of train steps + 5 s = 7.5 s; 168 steps, step_time 59.5 ms" in out


@pytest.mark.slow  # compiles two train programs and starts three worker processes: about a minute on 2 CPUs
def test_step_vs_torch_smallest_run_writes_every_row(tmp_path):
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        str(BENCHMARKS / "step_vs_torch.py"),
        "--steps",
        "2",
        "--repeats",
        "1",
        "--ks",
        "1",
        "--no-app-job",
    ]
    subprocess.run([*cmd, "--out", str(out)], check=True, timeout=600, env=os.environ)
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[0].startswith("bnstudy app, steps_per_call=1")
    assert any(n.startswith("lever: nn.max_pool") for n in names)
    assert any(n.startswith("lever: BN not folded into the one-channel conv1") for n in names)
    assert all(
        r["ms_per_step"] > 0 and len(result["seconds"][r["variant"].removesuffix(" (auto)")]) == 1
        for r in result["rows"]
    )
    if result["machine"]["versions"]["torch"]:
        assert result["torch_loss_check"]["falls"]
        assert any(n.startswith("PyTorch") for n in names)


def test_benchmarks_import_none_of_the_app_stack():
    """They must run on a bare JAX machine (jax, flax, optax, numpy)."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
        "import common, bench_pack, conv_forms, measure_cost, probe_overhead, profile_step, step_vs_torch; "
        "bad = {'hydra', 'omegaconf', 'wandb', 'tensorflow_datasets', 'tensorflow', 'orbax', 'pandas'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    """Run benchmarks/<name> with `args`; its stdout (it must exit 0)."""
    cmd = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True).stdout


def positive_numbers(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(v, float) and v > 0 for v in mapping.values())


def test_common_helpers_give_medians_ratios_and_round_robin_seconds(tmp_path):
    import common

    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    seconds = common.round_robin({"a": lambda: 0.5, "b": lambda: 0.25}, repeats=2, report=False)
    assert seconds == {"a": [0.5, 0.5], "b": [0.25, 0.25]}
    assert common.timed(lambda: sum(range(1000))) > 0
    data = common.random_data(8, 4)
    assert data.train_images.shape[0] == 8 and data.test_images.shape[0] == 4
    info = common.machine(extra_packages=())
    assert info["versions"]["jax"] and common.cpus_usable() >= 1
    common.write_json(tmp_path / "r.json", {"x": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}


def test_profile_step_sums_the_traced_xla_ops_by_kind(tmp_path):
    import profile_step

    assert profile_step.op_kind("transpose_copy_fusion.12") == "transpose_copy_fusion"
    assert profile_step.op_kind("ynn_fusion") == "ynn_fusion" and profile_step.op_kind("dot.1.2") == "dot"
    assert all(profile_step.NOT_OPS.match(n) for n in ("ThunkExecutor::Execute", "end: dot", "$profiler.py:1 x"))
    out = tmp_path / "profile.json"
    text = run_script("profile_step.py", "--model", "cnn", "--steps", "2", "--top", "3", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["step_ms"] > 0 and positive_numbers(result["op_ms_per_step"])
    kinds = result["op_ms_per_step"]
    assert any("fusion" in k for k in kinds)  # XLA's fused ops of the step were found in the trace
    assert not [k for k in kinds if profile_step.NOT_OPS.match(k) or k != profile_step.op_kind(k)]
    assert list(kinds.values()) == sorted(kinds.values(), reverse=True)
    assert "| unattributed" in text and result["machine"]["versions"]["jax"]


def test_torch_reference_loss_falls_over_its_steps():
    pytest.importorskip("torch")
    out = run_script("torch_reference.py", timeout=300)
    assert out.startswith("torch ") and "(falls)" in out


@pytest.mark.slow  # compiles the step, the probes and four more train steps
def test_measure_cost_smallest_run_times_every_call(tmp_path):
    out = tmp_path / "cost.json"
    text = run_script("measure_cost.py", "--repeats", "1", "--batch-size", "8", "--eval-batch", "8", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"step", "ics", "eval", "eval+units", "step[flax BatchNorm]"} <= set(result["median_s"])
    assert positive_numbers(result["median_s"]) and result["ratio"]["step"] == pytest.approx(1.0)
    assert "step[flax BatchNorm]" in text and result["machine"]["versions"]["jax"]


@pytest.mark.slow  # compiles a packed train step per device count
def test_bench_devices_smallest_run_prints_each_device_count():
    args = ["--fake-cpu-devices", "2", "--pack", "2", "--steps", "1", "--repeats", "1", "--batch", "8"]
    text = run_script("bench_devices.py", *args)
    assert "backend=cpu devices=2 pack=2" in text


@pytest.mark.slow  # compiles K=1 and K=2 packs and runs the compile-cache probe
def test_bench_pack_quick_run_writes_a_positive_rate_per_pack_size(tmp_path):
    out = tmp_path / "pack.json"
    run_script("bench_pack.py", "--quick", "--ks", "1,2", "--steps", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["config"]["ks"] == [1, 2] and result["machine"]["versions"]["jax"]
    assert result["pack"] and result["compile"]


@pytest.mark.slow  # compiles two train programs
def test_cost_study_quick_run_finishes_its_run_folders(tmp_path):
    text = run_script("cost_study.py", "--quick", "--norms", "none", "--batch-sizes", "8", "--out-dir", str(tmp_path))
    summaries = list((tmp_path / "quick" / "cost").glob("*/summary.json"))
    assert len(summaries) == 2 and "ms/step" in text
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "done" and summary["step_time"] > 0


@pytest.mark.slow  # compiles the train programs of two variants and the probes
def test_probe_overhead_smallest_run_writes_each_variant(tmp_path):
    out = tmp_path / "probe.json"
    args = ["--train", "256", "--test", "128", "--epochs", "1", "--repeats", "1", "--variants", "base,probe"]
    args += ["--population-batches", "1", "--train-subset", "128", "--calls", "1", "--out", str(out)]
    run_script("probe_overhead.py", *args)
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"base", "probe"} and result["device"]["versions"]["jax"]
    assert all(row["train_plus_eval"] > 0 for row in result["variants"].values())
    assert positive_numbers(result["one_call"])


def test_conv_forms_finds_the_deep_models_shapes_and_writes_a_choice_that_reads_back(tmp_path, monkeypatch):
    import conv_forms

    resnet = conv_forms.conv_shapes("resnet20", 128)
    as_keys = {conv_forms.shape_key(s): n for s, n in resnet.items()}
    # The stem is the one-channel stencil; 6 + 5 + 5 stride-1 convs and 2 strided ones.
    assert as_keys == {
        "32x32x16->16/1": 6,
        "32x32x16->32/2": 1,
        "16x16x32->32/1": 5,
        "16x16x32->64/2": 1,
        "8x8x64->64/1": 5,
    }
    assert {conv_forms.shape_key(s) for s in conv_forms.conv_shapes("cnn6", 128)} == {
        "28x28x32->32/1",
        "14x14x32->64/1",
        "14x14x64->64/1",
        "7x7x64->128/1",
        "7x7x128->128/1",
    }
    assert conv_forms.choose({"xla": 10.0, "im2col": 9.0, "taps": 9.6}, margin=0.05) == "im2col"
    assert conv_forms.choose({"xla": 10.0, "im2col": 9.6, "taps": 9.8}, margin=0.05) == "xla"  # within the margin
    choice = tmp_path / "conv_choice.py"
    choice.write_text(conv_forms.CHOICE_FILE.read_text())
    monkeypatch.setattr(conv_forms, "CHOICE_FILE", choice)
    chosen = {"8x8x64->64/1": ("im2col", "taps", "xla"), "16x16x32->32/1": ("xla", "xla", "xla")}
    choice.write_text(conv_forms.choice_source("cpu", chosen, "measured in a test"))
    namespace = {}
    exec(choice.read_text(), namespace)
    assert namespace["CHOSEN"]["cpu"] == {"8x8x64->64/1": ("im2col", "taps", "xla")}  # all-xla rows left out
    from bnstudy.core import conv_choice

    assert namespace["PINNED"] == conv_choice.PINNED
