"""Times the official recipe's PyTorch step (``../shared/torch_ref_bench.py``) on CPU or GPU.

  python experiments/torch_reference.py --device=cuda --batch=128 --width=64 --modes=sgd,sam,at

Imports the reference's model and step unchanged and only moves model and data to
``--device``; GPU timings synchronise before reading the clock. Prints
``torch MODE: N img/s`` lines, as the reference script does.
"""

import argparse
import importlib.util
import os
import statistics
import time

import torch

DEFAULT_REF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "torch_ref_bench.py")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", default=os.environ.get("TORCH_REF_BENCH", DEFAULT_REF))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="sgd,sam,at")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("torch_ref_bench", args.ref)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ref.PreActResNet18(w=args.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for mode in args.modes.split(","):
        for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
            ref.step(model, opt, x, y, mode, 0.05, args.pgd_steps)
        rates = []
        for _ in range(args.rounds):  # the median of rounds, as experiments/bench.py reports
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                ref.step(model, opt, x, y, mode, 0.05, args.pgd_steps)
            sync()
            rates.append(args.batch * args.steps / (time.perf_counter() - t))
        print(f"torch {mode}: {statistics.median(rates):.1f} img/s")


if __name__ == "__main__":
    main()
