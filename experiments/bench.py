"""Benchmarks of samrobust's real train step, PGD, evaluation and input pipeline.

  python -m experiments.bench --width=16 --batch=32 --modes=sgd,sam,at --pgd_steps=5 \
      --torch --json=experiments/results/bench_cpu.json
  python -m experiments.bench --model=fast_cifar --recipe=fast --width=32 --batch=512 \
      --modes=sgd,sam,at --pgd_steps=5 --sections=train

Times the train step that ``samrobust.main`` uses (``make_train_step``, all devices)
on synthetic in-memory CIFAR-shaped data: images/s, step time, compile time, peak memory
and model FLOPs utilisation (GPU), with the SAM/SGD and AT/SGD step-time ratios against
their targets (2.05x and 1.05*(k+1)x). Also times PGD-k (fori_loop rolled vs the default
unroll vs k plain input gradients), the evaluation suites, and the input pipeline.
``--torch`` runs the official recipe in PyTorch (``../shared/torch_ref_bench.py``, through
``experiments/torch_reference.py``) in the same session on the same device. Needs no
tensorflow.
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import default as default_config
from samrobust import attacks, input_pipeline, models, optim, parallel, robustness
from samrobust.autoattack.apgd import stage as apgd_stage
from samrobust.autoattack.fab import stage as fab_stage
from samrobust.autoattack.square import stage as square_stage
from samrobust.step import (
    INIT_COMPILER_OPTIONS,
    create_train_state,
    make_train_step,
    sam_groups,
    step_options,
)

# Dense bf16 tensor-core peaks (TFLOP/s) used for model-FLOPs utilisation.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MODES = ("sgd", "sam", "at", "sam_at")
# The other methods, as (mode, config overrides), for their step cost vs SGD's. Late SAM
# is timed before its start (its plain steps: the second pass must not run).
VARIANTS = {
    "sam_random0.5": ("sam", {"sam_probability": 0.5}),
    "sam_late_before_start": ("sam", {"sam_start_fraction": 0.7}),
    "at_awp": ("at", {"awp_gamma": 0.005}),
    "trades": ("at", {"at_loss": "trades"}),
    "mart": ("at", {"at_loss": "mart"}),
    "fgsm_rs": ("at", {"attack.steps": 1, "attack.step_size": 10 / 255}),
}


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first-call seconds incl. compilation, mean seconds of ``repeats`` later calls)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return first, (time.perf_counter() - t) / repeats


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def bench_model(args):
    """The benchmarked model (10 classes, CIFAR-like normalisation) at ``args``' settings."""
    dtype = jnp.bfloat16 if args.half_precision else jnp.float32
    return models.create_model(
        args.model, 10, (0.5,) * 3, (0.25,) * 3, width=args.width, dtype=dtype
    )


def forward_flops(model, image_shape=(32, 32, 3)) -> int:
    """FLOPs of one image's forward pass: 2 x multiply-adds of every conv and dense layer."""
    total = 0

    def count(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.Dense):
            fan_in = args[0].shape[-1] * math.prod(getattr(module, "kernel_size", ()))
            total += 2 * math.prod(out.shape) * fan_in
        return out

    x = jnp.zeros((1, *image_shape), jnp.float32)
    with nn.intercept_methods(count):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return total


def model_flops_per_step(model, mode: str, args) -> int | None:
    """Model FLOPs of one train step: a forward+backward pass counts 3 forwards, a PGD step
    (forward + input gradient) 2. None for the variants."""
    if mode not in MODES:
        return None
    k = args.pgd_steps
    passes = {"sgd": 3, "sam": 6, "at": 3 + 2 * k, "sam_at": 6 + 2 * k}[mode]
    return passes * forward_flops(model) * args.batch


def train_setup(args, name: str):
    """``samrobust.main``'s train step for the mode or variant ``name``, compiled on all
    devices, with a state and a batch: ``(compiled, state, (images, labels, key),
    compile_s)``; ``compiled(count)`` is the program of update ``count`` (cheaper SAM has
    two, picked on the host as in training)."""
    config = default_config.get_config(None if args.recipe == "paper" else args.recipe)
    mode, overrides = VARIANTS.get(name, (name, {}))
    config.update(
        mode=mode,
        model=args.model,
        width=args.width,
        batch_size=args.batch,
        half_precision=args.half_precision,
    )
    config.attack.steps = args.pgd_steps
    config.update_from_flattened_dict(overrides)
    mesh = parallel.default_mesh()
    model = bench_model(args)
    grouped = sam_groups(config, mesh.size) > 1
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 1000), grouped, 1000)
    state = create_train_state(jax.random.key(0), model, tx, (32, 32, 3), mesh)
    perturbs = optim.sam_perturbs(config, 1000)
    rng = np.random.default_rng(0)
    images, labels = parallel.shard_batch(
        mesh,
        rng.random((args.batch, 32, 32, 3), np.float32),
        rng.integers(0, 10, args.batch).astype(np.int32),
    )
    key = jax.random.key(1)
    t = time.perf_counter()
    programs = {
        p: make_train_step(model.apply, tx, step_options(config), mesh, p)
        .lower(state, images, labels, key)
        .compile()
        for p in ((None,) if perturbs is None else (False, True))
    }
    compile_s = time.perf_counter() - t

    def compiled(count: int):
        return programs[None if perturbs is None else perturbs(count)]

    return compiled, state, (images, labels, key), compile_s


def bench_train(args, mode: str) -> dict:
    """Step time, images/s, compile time, memory and MFU of ``mode``'s train step."""
    compiled, state, (images, labels, key), compile_s = train_setup(args, mode)
    memory = compiled(0).memory_analysis()
    model = bench_model(args)
    count = 0

    def run(state):
        nonlocal count
        count += 1
        return compiled(count - 1)(state, images, labels, key)[0]

    for _ in range(args.warmup):
        state = run(state)
    jax.block_until_ready(state)
    rounds = []
    for _ in range(args.rounds):  # the median of rounds resists a busy shared machine
        t = time.perf_counter()
        for _ in range(args.steps):
            state = run(state)
        jax.block_until_ready(state)
        rounds.append((time.perf_counter() - t) / args.steps)
    step_s = float(np.median(rounds))
    out = {
        "mode": mode,
        "step_ms": 1e3 * step_s,
        "images_per_s": args.batch / step_s,
        "compile_s": compile_s,
        "peak_bytes": peak_memory_bytes(),
        "model_flops_per_step": model_flops_per_step(model, mode, args),
        "step_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
    }
    peak = peak_tflops()
    if peak and out["model_flops_per_step"]:
        out["mfu"] = out["model_flops_per_step"] / step_s / (peak * 1e12)
    return out


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Kind of every instruction of an optimised HLO module, by what its fusion computes:
    ``conv weight-grad`` (a convolution with a kernel-shaped, k x k output), ``conv``
    (forward or input gradient), ``transpose/copy``, ``reduce``, ``elementwise``, ``other``."""
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"\n%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.S)
    }
    kinds = {}
    for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$", hlo_text, re.M
    ):
        name, shape, op, rest = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        ops = set(re.findall(r"= \S+ ([\w\-]+)\(", body)) | {op}
        dims = [int(d) for d in re.findall(r"\d+", shape.partition("[")[2].partition("]")[0])]
        if "convolution" in ops:
            kernel_shaped = len(dims) == 4 and dims[1] == dims[2] and dims[1] in (1, 3, 5, 7)
            kinds[name] = "conv weight-grad" if kernel_shaped else "conv"
        elif "transpose" in ops or op == "copy":
            kinds[name] = "transpose/copy"
        elif "reduce" in ops:
            kinds[name] = "reduce"
        elif op == "fusion":
            kinds[name] = "elementwise"
        else:
            kinds[name] = "other"
    return kinds


def bench_profile(args, mode: str, steps: int = 5) -> dict:
    """Where ``mode``'s train step spends its time: a ``jax.profiler`` trace of ``steps``
    steps, XLA op time per step (summed over devices) grouped by :func:`op_kinds`, and the
    slowest ops. Made for XLA:CPU, whose trace names every op after its HLO instruction."""
    program, state, batch, _ = train_setup(args, mode)
    compiled = program(0)  # the first update's program
    kinds = op_kinds(compiled.as_text())
    for _ in range(2):
        state = compiled(state, *batch)[0]
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            state = compiled(state, *batch)[0]
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            per_op[e["name"]] += e["dur"] / 1e3 / steps  # us -> ms per step
    per_kind = collections.Counter()
    for name, ms in per_op.items():
        per_kind[kinds[name]] += ms
    total = sum(per_kind.values())
    return {
        "mode": mode,
        "op_ms_per_step": total,
        "kinds_ms": dict(per_kind.most_common()),
        "kinds_share": {k: v / total for k, v in per_kind.most_common()},
        "slowest_ops_ms": dict((f"{n} ({kinds[n]})", v) for n, v in per_op.most_common(10)),
    }


def bench_pgd(args) -> list[dict]:
    """PGD-k per-step cost: rolled fori_loop vs the default unroll vs k single gradients."""
    model = bench_model(args)
    x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
    y = jnp.arange(args.batch) % 10
    variables = jax.jit(lambda: model.init(jax.random.key(1), x[:1], train=False))()
    loss_fn = attacks.input_loss(lambda z: model.apply(variables, z, train=False))
    grad = jax.jit(jax.grad(loss_fn))
    _, grad_s = timed(grad, x, y, repeats=args.steps)
    rows = []
    for k in (5, 10):
        row = {"k": k, "grad_ms": 1e3 * grad_s}
        for name, unroll in (("rolled", 1), ("default", None)):
            fn = jax.jit(
                lambda x, y, key, k=k, unroll=unroll: attacks.pgd(
                    loss_fn, x, y, key, eps=8 / 255, step_size=2 / 255, steps=k, unroll=unroll
                )
            )
            compile_s, s = timed(fn, x, y, jax.random.key(2), repeats=args.steps)
            row[f"{name}_ms_per_step"] = 1e3 * s / k
            row[f"{name}_compile_s"] = compile_s
        row["default_vs_grad"] = row["default_ms_per_step"] / row["grad_ms"]
        row["rolled_vs_grad"] = row["rolled_ms_per_step"] / row["grad_ms"]
        rows.append(row)
    return rows


def bench_attack_steps(args) -> list[dict]:
    """AutoAttack's per-iteration cost against one jitted input gradient (APGD, FAB) or one
    jitted forward pass (Square), on a random-init model and random CIFAR-shaped points:
    ``u`` iterations per jitted call driven from Python (the cascade on CPU) for u = 1, 2,
    4, and all of them in one ``lax.fori_loop`` (the cascade elsewhere)."""
    model = bench_model(args)
    x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(1), x[:1], train=False))()
    logits_fn = jax.tree_util.Partial(robustness.model_logits_fn(model.apply), variables)
    y = jnp.argmax(jax.jit(logits_fn)(x), axis=-1)
    keys = attacks.example_keys(jax.random.key(2), jnp.arange(args.batch))
    loss_fn = attacks.input_loss(logits_fn)
    _, grad_s = timed(jax.jit(jax.value_and_grad(loss_fn)), x, y, repeats=args.steps)
    _, fwd_s = timed(jax.jit(logits_fn), x, repeats=args.steps)
    n = 4 * args.steps  # iterations per timing
    stages = {
        "apgd": (apgd_stage(eps=8 / 255, norm="linf", n_iter=n), grad_s),
        "fab": (fab_stage(eps=8 / 255, norm="linf", n_iter=n, n_target_classes=1), grad_s),
        "square": (square_stage(eps=8 / 255, norm="linf", n_queries=n), fwd_s),
    }
    rows = []
    for name, (stage, base_s) in stages.items():
        state = jax.jit(stage.init)(logits_fn, x, y, keys, jnp.int32(0))
        row = {"attack": name, "base": "gradient" if base_s is grad_s else "forward"}
        row["base_ms"] = 1e3 * base_s
        for u in (1, 2, 4):

            def block(lf, s, i0, u=u, stage=stage):
                for t in range(u):
                    s = stage.step(lf, s, i0 + t)
                return s

            fn = jax.jit(block)

            def host_loop(s, fn=fn, u=u):
                for i in range(0, n, u):
                    s = fn(logits_fn, s, jnp.int32(i))
                return s

            _, s_ = timed(host_loop, state, repeats=1)
            row[f"host_u{u}_ms"] = 1e3 * s_ / n
            row[f"host_u{u}_vs_base"] = s_ / n / base_s
        loop = jax.jit(
            lambda lf, s, stage=stage: jax.lax.fori_loop(0, n, lambda i, c: stage.step(lf, c, i), s)
        )
        _, s_ = timed(loop, logits_fn, state, repeats=1)
        row["fori_loop_ms"] = 1e3 * s_ / n
        row["fori_loop_vs_base"] = s_ / n / base_s
        rows.append(row)
    return rows


def bench_eval(args) -> dict:
    """Images/s of the paper's PGD-10 budget (compilation excluded) and of AutoAttack
    standard (compilation included).

    A random-init model on ``2 * batch`` random CIFAR-shaped images. AutoAttack runs its full
    budget at a tiny radius (0.01/255), so no point is fooled and every attack runs on every
    point: the worst case, what a robust model costs. Its figure is images per second of the
    whole cascade; ``autoattack_<attack>_images_per_s`` are per attack.
    """
    model = bench_model(args)
    mesh = parallel.default_mesh()
    logits_fn = robustness.model_logits_fn(model.apply)
    n = args.batch * 2
    images = np.random.default_rng(0).random((n, 32, 32, 3), np.float32)
    variables = jax.jit(lambda: model.init(jax.random.key(1), images[:1], train=False))()
    # Labels = the model's predictions: every point is attacked.
    labels = np.asarray(jnp.argmax(jax.jit(logits_fn)(variables, images), axis=-1), np.int32)
    report = robustness.pgd_suite(
        logits_fn,
        variables,
        images,
        labels,
        specs=robustness.PAPER_SUITE[:1],
        batch_size=args.batch,
        mesh=mesh,
    )
    out = {f"{k}_images_per_s": v for k, v in report["images_per_s"].items()}
    result = robustness.autoattack_suite(
        logits_fn, variables, images, labels, eps=0.01 / 255, batch_size=args.batch, mesh=mesh
    )
    out["autoattack_images_per_s"] = n / sum(result.seconds.values())
    out.update(
        {f"autoattack_{k}_images_per_s": result.attacked[k] / s for k, s in result.seconds.items()}
    )
    out["autoattack_robust_accuracy"] = result.robust_accuracy
    return out


def bench_init(args) -> dict:
    """Compilation of the model's initialisation at XLA's default optimisation level and at
    ``INIT_COMPILER_OPTIONS`` (what ``create_train_state`` uses on the CPU), and whether
    both give the same weights."""
    model = bench_model(args)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    lowered = jax.jit(lambda k: model.init(k, x, train=False)).lower(jax.random.key(0))
    out, weights = {}, []
    for name, options in (("default", {}), ("init_options", INIT_COMPILER_OPTIONS)):
        t = time.perf_counter()
        compiled = lowered.compile(compiler_options=options)
        out[f"{name}_compile_s"] = time.perf_counter() - t
        weights.append(jax.tree.leaves(compiled(jax.random.key(0))))
    out["same_weights"] = all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    return out


def bench_input(args) -> dict:
    """Host batches/s of the in-memory batcher (digits, and CIFAR-shaped arrays as tfds gives)."""
    out = {}
    digits = input_pipeline.load_digits()
    cifar_like = np.random.default_rng(0).random((50_000, 32, 32, 3), np.float32)
    for name, images, labels in (
        ("digits", digits.train_images, digits.train_labels),
        ("cifar_shaped", cifar_like, np.zeros(50_000, np.int32)),
    ):
        batch = min(args.batch, len(images))
        it = input_pipeline.prefetch(input_pipeline.train_batches(images, labels, batch, seed=0))
        next(it)
        t = time.perf_counter()
        for _ in range(50):
            next(it)
        out[f"{name}_images_per_s"] = 50 * batch / (time.perf_counter() - t)
    return out


def bench_torch(args) -> dict:
    """The PyTorch reference (``experiments/torch_reference.py``) on this backend's device."""
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
    modes = ",".join(m for m in args.modes.split(",") if m in ("sgd", "sam", "at"))
    cmd = [
        sys.executable,
        script,
        "--device",
        device,
        "--batch",
        str(args.batch),
        "--width",
        str(args.width),
        "--pgd-steps",
        str(args.pgd_steps),
        "--steps",
        str(args.steps),
        "--rounds",
        str(args.rounds),
        "--modes",
        modes,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = {}
    for line in proc.stdout.splitlines():  # "torch sgd: 123.4 img/s"
        if line.startswith("torch "):
            mode, rate = line[6:].split(":")
            out[mode] = float(rate.split()[0])
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (``argv``: default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="preact_resnet18", choices=models.MODELS)
    p.add_argument(
        "--recipe",
        default="paper",
        choices=("paper", "fast"),
        help="the training recipe around the step: configs/default.py's (paper) or its "
        "'fast' variant (label smoothing, Nesterov, SAM groups of sam_group_size...)",
    )
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument(
        "--modes",
        default="sgd,sam,at,sam_at",
        help=f"train-step modes: any of {', '.join(MODES + tuple(VARIANTS))}",
    )
    p.add_argument("--pgd_steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported")
    p.add_argument("--half_precision", action="store_true")
    p.add_argument(
        "--sections",
        default="train,pgd,eval,input",
        help="any of train,pgd,attack_steps,eval,input,init,profile (profile: XLA op time by "
        "kind; init: compiling the initial weights)",
    )
    p.add_argument("--torch", action="store_true", help="also run the PyTorch reference")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--cpu_devices", type=int, default=None, help=parallel.CPU_DEVICES_HELP)
    args = p.parse_args(argv)
    unknown = sorted(set(args.modes.split(",")) - set(MODES) - set(VARIANTS))
    if unknown:
        p.error(f"--modes: unknown {unknown}; known: {', '.join(MODES + tuple(VARIANTS))}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    parallel.set_xla_cpu_defaults()
    parallel.set_cpu_devices(args.cpu_devices)
    sections = args.sections.split(",")
    result = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})",
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "args": vars(args),
    }
    if "train" in sections:
        rows = [bench_train(args, m) for m in args.modes.split(",")]
        base = next((r["step_ms"] for r in rows if r["mode"] == "sgd"), None)
        for r in rows:
            if base:
                r["vs_sgd"] = r["step_ms"] / base
            r["target_vs_sgd"] = {
                "sgd": 1.0,
                "sam": 2.05,
                "at": 1.05 * (args.pgd_steps + 1),
                "sam_at": 1.05 * (args.pgd_steps + 2),
            }.get(r["mode"])
        result["train"] = rows
        print(
            f"\n{result['device']}, {args.model} width {args.width}, batch {args.batch}, "
            f"PGD-{args.pgd_steps}, {'bf16' if args.half_precision else 'f32'}"
        )
        print(
            f"{'mode':22}{'img/s':>10}{'step ms':>10}{'x SGD':>8}{'target':>8}"
            f"{'compile s':>11}{'temp MiB':>10}{'MFU':>7}"
        )
        for r in rows:
            mem = f"{r['step_temp_bytes'] / 2**20:.0f}" if r["step_temp_bytes"] else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            print(
                f"{r['mode']:22}{r['images_per_s']:10.1f}{r['step_ms']:10.2f}"
                f"{r.get('vs_sgd', float('nan')):8.2f}{r['target_vs_sgd'] or float('nan'):8.2f}"
                f"{r['compile_s']:11.1f}{mem:>10}{mfu:>7}"
            )
    if "profile" in sections:
        result["profile"] = [bench_profile(args, m) for m in args.modes.split(",")]
        for r in result["profile"]:
            print(f"\nprofile of the {r['mode']} step: {r['op_ms_per_step']:.1f} ms of XLA ops")
            for kind, ms in r["kinds_ms"].items():
                print(f"  {kind:18}{ms:9.2f} ms {100 * r['kinds_share'][kind]:6.1f}%")
    if "pgd" in sections:
        result["pgd"] = bench_pgd(args)
        print("\nPGD-k, ms per step (x one input gradient):")
        for r in result["pgd"]:
            print(
                f"  k={r['k']:2d}: rolled fori_loop {r['rolled_ms_per_step']:.2f} "
                f"({r['rolled_vs_grad']:.2f}x), default unroll {r['default_ms_per_step']:.2f} "
                f"({r['default_vs_grad']:.2f}x), gradient {r['grad_ms']:.2f}"
            )
    if "attack_steps" in sections:
        result["attack_steps"] = bench_attack_steps(args)
        print("\nAutoAttack ms per iteration (x one jitted gradient / forward pass):")
        for r in result["attack_steps"]:
            cells = ", ".join(
                f"{k[:-3]} {r[k]:.2f} ({r[k[:-3] + '_vs_base']:.2f}x)"
                for k in r
                if k.endswith("_ms") and k != "base_ms"
            )
            print(f"  {r['attack']:7}{r['base']} {r['base_ms']:.2f}; {cells}")
    if "eval" in sections:
        result["eval"] = bench_eval(args)
        print("\nevaluation images/s:", {k: round(v, 1) for k, v in result["eval"].items()})
    if "init" in sections:
        result["init"] = bench_init(args)
        print(
            "\ninitialisation:",
            {k: round(v, 1) if isinstance(v, float) else v for k, v in result["init"].items()},
        )
    if "input" in sections:
        result["input"] = bench_input(args)
        print("input pipeline images/s:", {k: round(v) for k, v in result["input"].items()})
    if args.torch:
        result["torch"] = bench_torch(args)
        print("\nPyTorch reference img/s:", result["torch"])
        for r in result.get("train", []):
            if r["mode"] in result["torch"]:
                r["vs_torch"] = r["images_per_s"] / result["torch"][r["mode"]]
                print(f"  {r['mode']}: samrobust / torch = {r['vs_torch']:.2f}")
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
