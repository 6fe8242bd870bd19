"""Each 3x3 convolution of the deep networks in each form and direction: the measurement that picks the forms.

    python benchmarks/conv_forms.py [--repeats 9] [--batch 128] [--out conv_forms.json] [--write]

For every many-channel convolution shape of ResNet-20 and the depth-6 CNN (found by tracing the models), each
direction (forward, input gradient, kernel gradient) in each form of `bnstudy.core.conv_forms` (xla, im2col,
rows, taps) is jitted alone and timed, round-robin over `--repeats` rounds so that a change of machine load hits every
form alike, with bnstudy's process settings (XLA flags, malloc). One more column, `ynn`, is XLA's convolution
with YNNPACK's convolutions on (the XLA flag bnstudy switches off): that flag is process-wide, so it is timed in
a worker subprocess in the same rounds, and can only be chosen for a whole process (the step-level lever in
step_vs_torch.py), not per shape.

The choice per shape and direction is the fastest form whose median beats xla's by more than `--margin` (default
5%, so that noise does not move a shape off XLA); otherwise xla. The 2-conv CNN's shapes
(`conv_choice.PINNED`) are measured but never moved. `--write` rewrites bnstudy/core/conv_choice.py's table for
this backend. Per model, the summed milliseconds of its convolutions (each shape times how often the model has
it) under XLA and under the choice say what the choice saves a train step. Needs jax, flax and numpy only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)

HERE = Path(__file__).resolve().parent
MODELS = {"resnet20": ("resnet", 20), "cnn6": ("cnn", 6)}
CHOICE_FILE = HERE.parent / "bnstudy" / "core" / "conv_choice.py"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    ap.add_argument("--calls", type=int, default=3, help="calls per timing (default 3)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--margin", type=float, default=0.05, help="a form must beat xla by this fraction")
    ap.add_argument("--no-ynn", action="store_true", help="skip the YNNPACK worker")
    ap.add_argument("--write", action="store_true", help="rewrite bnstudy/core/conv_choice.py for this backend")
    ap.add_argument("--out", help="write the measurement as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def set_process_settings(ynn: bool) -> None:
    """bnstudy's malloc settings and XLA flags (step_vs_torch.py's), with YNNPACK's convolutions back on when
    `ynn`."""
    import step_vs_torch

    step_vs_torch.set_process_settings("without:xla_cpu_experimental_ynn_fusion_type" if ynn else "on")


def conv_shapes(model: str, batch: int) -> Counter:
    """{(x shape, kernel shape, stride): how many convolutions of `model` have it}, found by tracing its init
    with `conv_forms.conv3x3` recording what it is called with."""
    import jax
    import jax.numpy as jnp

    from bnstudy.core import conv_forms
    from bnstudy.core.datasets import DIGITS

    seen = Counter()
    plain = conv_forms.conv3x3

    def recording(x, kernel, stride=1, forms=None):
        seen[(tuple(x.shape), tuple(kernel.shape), stride)] += 1
        return plain(x, kernel, stride, forms)

    name, depth = MODELS[model]
    net = common.build_model(name, depth=depth)
    conv_forms.conv3x3 = recording
    try:
        x = jnp.zeros((batch, *DIGITS.image_shape), jnp.float32)
        jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=True))
    finally:
        conv_forms.conv3x3 = plain
    return seen


def direction_programs(x_shape, k_shape, stride, forms):
    """{(direction, form): (jitted program, its arguments)} for one shape."""
    import jax
    import jax.numpy as jnp

    from bnstudy.core import conv_forms as cf

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.float32)
    k = jax.random.normal(keys[1], k_shape, jnp.float32) * (2.0 / (9 * k_shape[2])) ** 0.5
    dout = jax.random.normal(keys[2], cf.xla_conv(x, k, stride).shape, jnp.float32)
    directions = {
        "forward": lambda x, k, d, f: cf.forward(x, k, stride, f),
        "input_grad": lambda x, k, d, f: cf.input_grad(x, k, d, stride, f),
        "kernel_grad": lambda x, k, d, f: cf.kernel_grad(x, k, d, stride, f),
    }
    programs = {}
    for form in forms:
        for direction, fn in directions.items():
            programs[(direction, form)] = (jax.jit(lambda x, k, d, fn=fn, f=form: fn(x, k, d, f)), (x, k, dout))
    return programs


def shape_key(shape) -> str:
    from bnstudy.core import conv_forms

    x_shape, k_shape, stride = shape
    return conv_forms.shape_key(x_shape, k_shape, stride)


class Timer:
    """Every (shape, direction, form) program, compiled and warmed up; `round()` times each once."""

    def __init__(self, shapes, forms, calls: int):
        import jax

        self.calls = calls
        self.programs = {}
        for shape in shapes:
            for (direction, form), (fn, args) in direction_programs(*shape, forms).items():
                jax.block_until_ready(fn(*args))
                self.programs[(shape_key(shape), direction, form)] = (fn, args)

    def round(self) -> dict[tuple[str, str, str], float]:
        import time

        import jax

        out = {}
        for key, (fn, args) in self.programs.items():
            t0 = time.perf_counter()
            for _ in range(self.calls):
                jax.block_until_ready(fn(*args))
            out[key] = (time.perf_counter() - t0) / self.calls
        return out


def worker_main(spec: str) -> None:
    """Subprocess with YNNPACK's convolutions on: time the xla form on request ('run' lines, JSON answers)."""
    shapes, calls = json.loads(spec)
    set_process_settings(ynn=True)
    timer = Timer([(tuple(x), tuple(k), s) for x, k, s in shapes], ("xla",), calls)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps([[*key, t] for key, t in timer.round().items()]), flush=True)


class YnnWorker:
    def __init__(self, shapes, calls: int):
        spec = json.dumps([[[list(x), list(k), s] for x, k, s in shapes], calls])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if line.strip() == "READY":
                return
        raise RuntimeError(f"the YNNPACK worker exited with code {self.proc.wait()}")

    def round(self) -> dict[tuple[str, str, str], float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the YNNPACK worker exited with code {self.proc.wait()}")
        return {(shape, direction, "ynn"): t for shape, direction, _, t in json.loads(line)}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def choose(ms: dict[str, float], margin: float) -> str:
    """The fastest of `ms` ({form: median ms}, bnstudy's process settings only) if it beats xla by `margin`."""
    best = min(ms, key=ms.get)
    return best if ms[best] < (1.0 - margin) * ms["xla"] else "xla"


def choice_source(backend: str, chosen: dict[str, tuple[str, str, str]], header: str) -> str:
    """conv_choice.py with `chosen` as this backend's table (other backends' tables kept)."""
    from bnstudy.core import conv_choice

    tables = {**conv_choice.CHOSEN, backend: {k: v for k, v in chosen.items() if v != ("xla",) * 3}}
    text = CHOICE_FILE.read_text()
    lines = [
        '# backend -> {"HxWxC->O/stride": (forward, input_grad, kernel_grad)}',
        f"# {header}",
        "CHOSEN: dict[str, dict[str, tuple[str, str, str]]] = {",
    ]
    for name, table in sorted(tables.items()):
        lines.append(f"    {json.dumps(name)}: {{")
        lines += [
            f"        {json.dumps(k)}: ({', '.join(json.dumps(f) for f in v)})," for k, v in sorted(table.items())
        ]
        lines.append("    },")
    return text[: text.index("# backend -> ")] + "\n".join([*lines, "}"]) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    set_process_settings(ynn=False)
    import statistics

    import jax

    from bnstudy.core import conv_choice, conv_forms

    info = common.machine(extra_packages=())
    common.print_header("3x3 convolution forms", info)
    per_model = {m: conv_shapes(m, args.batch) for m in MODELS}
    shapes = sorted({s for counts in per_model.values() for s in counts}, key=lambda s: (-s[0][1], s[0][3], s[2]))
    timer = Timer(shapes, conv_forms.FORMS, args.calls)
    ynn = None if args.no_ynn or jax.default_backend() != "cpu" else YnnWorker(shapes, args.calls)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.repeats):
        for key, t in {**timer.round(), **(ynn.round() if ynn else {})}.items():
            samples.setdefault(key, []).append(t)
        print(f"  round {r + 1}/{args.repeats} done, load {common.load()[0]:.2f}", flush=True)
    if ynn:
        ynn.close()
    ms = {key: 1e3 * statistics.median(ts) for key, ts in samples.items()}

    rows, chosen = [], {}
    for shape in shapes:
        key = shape_key(shape)
        picks = []
        for direction in conv_forms.DIRECTIONS:
            own = {f: ms[(key, direction, f)] for f in conv_forms.FORMS}
            pick = "xla" if key in conv_choice.PINNED else choose(own, args.margin)
            picks.append(pick)
            rows.append(
                {"shape": key, "direction": direction, **own, "ynn": ms.get((key, direction, "ynn")), "chosen": pick}
            )
        chosen[key] = tuple(picks)
    print_table(rows, conv_choice.PINNED)

    totals = {}
    for model, counts in per_model.items():
        xla = sum(n * ms[(shape_key(s), d, "xla")] for s, n in counts.items() for d in conv_forms.DIRECTIONS)
        pick = sum(
            n * ms[(shape_key(s), d, chosen[shape_key(s)][i])]
            for s, n in counts.items()
            for i, d in enumerate(conv_forms.DIRECTIONS)
        )
        totals[model] = {"xla_ms": xla, "chosen_ms": pick}
        print(f"  {model}: its convolutions {xla:.1f} ms a step with XLA's, {pick:.1f} ms with the chosen forms")
    print(f"  load before {info['load_start'][0]:.2f}, after {common.load()[0]:.2f}")

    backend = jax.default_backend()
    if args.write:
        header = (
            f"measured on {info['device_kind']} ({info['cpus_usable']} CPUs), jax {info['versions'].get('jax')}, "
            f"batch {args.batch}, {args.repeats} rounds, margin {args.margin:.0%}"
        )
        CHOICE_FILE.write_text(choice_source(backend, chosen, header))
        print(f"  wrote {CHOICE_FILE.relative_to(HERE.parent)} ({backend})")
    result = {"machine": info, "batch": args.batch, "rows": rows, "chosen": chosen, "models": totals}
    common.write_json(args.out, result)
    return result


def print_table(rows: list[dict], pinned) -> None:
    from bnstudy.core.conv_forms import FORMS

    print(f"\n| shape (HxWxC->O/stride) | direction | {' | '.join(FORMS)} | ynn | chosen |")
    print("|---|---|" + "---|" * (len(FORMS) + 2))
    for r in rows:
        ynn = "" if r["ynn"] is None else f"{r['ynn']:.2f}"
        mark = " (pinned)" if r["shape"] in pinned else ""
        print(
            f"| {r['shape']} | {r['direction']} | " + " | ".join(f"{r[form]:.2f}" for form in FORMS) + f" | {ynn} "
            f"| {r['chosen']}{mark} |"
        )
    print("(ms per call, median over rounds)\n")


if __name__ == "__main__":
    main()
