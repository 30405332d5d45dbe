"""Bytes uploaded for a run's metrics on ``gs://``, against a real GCS emulator.

  python -m experiments.bench_metrics --steps=10000 \
      --json=experiments/results/bench_metrics.json

Logs a ``--steps`` run's training scalars (those ``samrobust.train`` logs) with
:class:`samrobust.metrics.MetricWriter` into ``gs://`` on fake-gcs-server, every 100 steps
(the default ``log_every_steps``) and every step, and prints, per setting, the bytes the
appenders uploaded (new bytes composed on the server, plus the rare whole rewrites that keep
the composite objects below GCS's component limit) and the bytes that rewriting each whole
object at every flush uploads (the sum of both objects' sizes after each flush, which is
what samrobust did before), with the objects' final sizes.
"""

import argparse
import datetime
import json
import platform
import sys
import tempfile
from collections.abc import Sequence

from experiments.gcs_emulator import fake_gcs_server
from samrobust.metrics import MetricWriter

BUCKET = "bench-metrics"


def measure(client: object, bucket: str, steps: int, log_every: int) -> dict[str, float]:
    """Runs one simulated run's metric logging in ``gs://bucket``; its byte counts."""
    workdir = f"gs://{bucket}/log_every_{log_every}"
    writer = MetricWriter(workdir)
    whole_rewrites = 0
    for step in range(log_every, steps + 1, log_every):
        scalars = {"train/loss": 2.0 / step**0.1, "train/accuracy": 0.9, "train/learning_rate": 0.1}
        writer.write(step, scalars, images_per_s=1234.5)
        blobs = client.bucket(bucket).list_blobs(prefix=f"log_every_{log_every}/")
        whole_rewrites += sum(b.size for b in blobs)
    appenders = (writer._jsonl, writer._events)
    uploaded = sum(a.bytes_uploaded for a in appenders)
    writer.close()
    final = sum(b.size for b in client.bucket(bucket).list_blobs(prefix=f"log_every_{log_every}/"))
    return {
        "log_every_steps": log_every,
        "flushes": steps // log_every,
        "final_bytes": final,
        "uploaded_bytes": uploaded,
        "whole_rewrite_bytes": whole_rewrites,
        "ratio": whole_rewrites / uploaded,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (``argv``: default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        with fake_gcs_server(f"{tmp}/fake-gcs-server.log", BUCKET) as client:
            rows = [measure(client, BUCKET, args.steps, every) for every in (100, 1)]
    for row in rows:
        print(
            f"{args.steps} steps, log every {row['log_every_steps']}: {row['flushes']} flushes, "
            f"objects {row['final_bytes']:,} B; uploaded {row['uploaded_bytes']:,} B "
            f"(rewriting whole objects: {row['whole_rewrite_bytes']:,} B, {row['ratio']:.0f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": "python -m experiments.bench_metrics " + " ".join(sys.argv[1:]),
                    "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
                    "steps": args.steps,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
