"""One jitted forward pass and one input gradient of a trained run's network, JAX against
torch on the same weights (the cost per iteration of Square and of APGD/FAB on CPU).

  python -m experiments.conv_speed --workdir=experiments/results/cifar10_cpu/runs/at_linf_eps2_s0 \\
      --batch=160 [--reps=20] [--torch]

XLA flags apply per process, so compare them one process each, e.g. three alternating
rounds (the figures in ``experiments/results/conv_speed_cpu_w8_b160.txt``):

  for r in 1 2 3; do for f in "" "--xla_cpu_experimental_ynn_fusion_type="; do
    XLA_FLAGS="$f" python -m experiments.conv_speed --workdir=RUN --batch=160 --reps=20 --torch
  done; done
"""

import argparse
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.runs import load_run


def per_call_ms(fn: Callable[[], object], reps: int) -> float:
    """Mean wall time of ``fn()`` over ``reps`` calls after one warm-up call, in ms."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / reps * 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (``argv``: default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a samrobust.main run")
    p.add_argument("--batch", type=int, default=160)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--torch", action="store_true", help="also time the torch copy")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run = load_run(args.workdir)
    x = np.asarray(run.dataset.test_images[: args.batch], np.float32)
    y = np.asarray(run.dataset.test_labels[: args.batch], np.int32)

    def loss(xx: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(run.logits_fn(run.variables, xx))
        return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))

    forward, grad = jax.jit(run.logits_fn), jax.jit(jax.grad(loss))
    print(
        f"jax   XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} batch {args.batch}: "
        f"forward {per_call_ms(lambda: forward(run.variables, x), args.reps):.1f} ms, "
        f"input gradient {per_call_ms(lambda: grad(x), args.reps):.1f} ms",
        flush=True,
    )
    if args.torch:
        import torch

        from experiments.torch_preact import from_flax, nhwc_to_nchw

        net = from_flax(
            run.variables,
            mean=run.dataset.mean,
            std=run.dataset.std,
            padding=run.config.get("padding", "same"),
        ).eval()
        xt, yt = nhwc_to_nchw(x), torch.from_numpy(y.astype(np.int64))

        def t_forward() -> torch.Tensor:
            with torch.no_grad():
                return net(xt)

        def t_grad() -> torch.Tensor:
            xx = xt.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(net(xx), yt, reduction="sum").backward()
            return xx.grad

        print(
            f"torch threads {torch.get_num_threads()} batch {args.batch}: "
            f"forward {per_call_ms(t_forward, args.reps):.1f} ms, "
            f"input gradient {per_call_ms(t_grad, args.reps):.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
