"""Metric logging (``samrobust.metrics``): the JSON lines and TensorBoard's own reader."""

import json

from samrobust.metrics import MetricWriter, format_seconds


def test_scalars_reach_the_json_lines_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    writer = MetricWriter(tmp_path)
    writer.write(10, {"train/loss": 2.5, "train/accuracy": 0.25}, images_per_s=100.0)
    writer.write(20, {"train/loss": 1.5, "train/accuracy": 0.5})
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 10, "train/loss": 2.5, "train/accuracy": 0.25, "images_per_s": 100.0},
        {"step": 20, "train/loss": 1.5, "train/accuracy": 0.5},
    ]
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/accuracy", "train/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 2.5), (20, 1.5)]


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path / "run", enabled=False)  # a process other than 0
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_progress_lines_print_durations_as_hours_minutes_seconds():
    assert format_seconds(0) == "0:00:00"
    assert format_seconds(3725.9) == "1:02:05"  # truncated, not rounded
    assert format_seconds(100 * 3600 + 59) == "100:00:59"
