"""Metrics: JSON-lines format, append on resume, NaN -> null, TensorBoard event contents,
sample text files, and the throttled console progress line."""

import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from smatch_jax.metrics import MetricWriter, Progress, to_json_number


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_format_and_types(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"loss": 2.5, "acc": np.float32(0.25), "n": np.int64(7)})
        w.write_scalars(2, {"loss": jnp.asarray(1.5), "ok": True, "x": jnp.ones((1,))})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:2] == ["step", "time"]
    assert first["step"] == 1 and isinstance(first["time"], float)
    assert first["loss"] == 2.5 and first["acc"] == 0.25 and first["n"] == 7
    assert isinstance(first["n"], int)
    assert second == {"step": 2, "time": second["time"], "loss": 1.5, "ok": 1, "x": 1.0}


def test_jsonl_is_flushed_each_call(tmp_path):
    w = MetricWriter(tmp_path, tensorboard=False)
    w.write_scalars(3, {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0  # before close
    w.close()
    w.close()


def test_append_on_reopen(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"loss": 3.0})
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(2, {"loss": 2.0})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_nonfinite_become_null(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"a": float("nan"), "b": np.float32("inf"), "c": -jnp.inf, "d": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["a"] is None and record["b"] is None and record["c"] is None
    assert record["d"] == 1.0


def test_bad_inputs(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(1, {"step": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            w.write_scalars(1, {"v": np.ones(3)})
    assert to_json_number(np.bool_(False)) == 0


def test_disabled_writer_writes_nothing(tmp_path):
    with MetricWriter(tmp_path / "w", enabled=False) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_texts(1, {"s": "x"})
        w.write_hparams({"lr": 1})
        w.flush()
    assert not (tmp_path / "w").exists()


def test_texts_and_hparams_files(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_texts(10, {"sample/0": "hello\nworld", "sample/1": "bye"})
        w.write_hparams({"model": {"d": 64}, "lr": 3e-4})
    text = (tmp_path / "samples" / "step_10.txt").read_text()
    assert "=== sample/0 ===\nhello\nworld\n" in text and "=== sample/1 ===\nbye\n" in text
    assert json.loads((tmp_path / "hparams.json").read_text()) == {"model": {"d": 64}, "lr": 3e-4}


def read_events(directory):
    """Parse every TFRecord-framed Event in the event files under ``directory``."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    events = []
    files = sorted(directory.rglob("events.out.tfevents.*"))
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert length_crc == masked_crc32c(header)
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert payload_crc == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            pos += 16 + length
    return files, events


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricWriter(tmp_path) as w:
        w.write_scalars(1, {"train/loss": 2.0, "train/nan": float("nan")})
        w.write_scalars(2, {"train/loss": jnp.float32(1.5)})
        w.write_texts(2, {"samples": "a <b>\nline2"})
        w.write_hparams({"lr": 0.1})
    files, events = read_events(w.tensorboard_dir)
    assert len(files) == 1
    scalars, texts = {}, {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            else:
                texts[value.tag.removesuffix("/text_summary")] = value.tensor.string_val[0].decode()
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert "train/nan" not in scalars  # nothing measured: null in metrics.jsonl only
    assert "a <b>" in texts["samples"] and "line2" in texts["samples"]
    assert "| lr | 0.1 |" in texts["hparams"]


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_non_tty_lines_and_throttle():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(100, stream=out, every_s=1.0, tokens_per_step=2000, clock=clock)
    assert not p.tty
    assert p.update(1, loss=2.0)  # first call always prints
    clock.t += 0.5
    assert not p.update(2, loss=1.9)  # throttled
    clock.t += 0.5
    assert p.update(11, loss=jnp.float32(1.23456))  # 10 steps in 1 s after the first update
    clock.t += 0.1
    assert p.update(100, loss=1.0)  # the last step always prints
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[0].startswith("step   1/100 (1.0%) | loss 2")
    assert lines[1] == (
        "step  11/100 (11.0%) | loss 1.235 | 10.0 steps/s | 20.0k tok/s | ETA 0:00:09"
    )
    assert lines[2].startswith("step 100/100 (100.0%)") and lines[2].endswith("ETA 0:00:00")


def test_progress_tty_uses_carriage_return():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10, start_step=4, stream=out, every_s=0.0, tty=True, clock=clock)
    clock.t += 2.0
    p.update(5, loss=float("nan"), long_name_metric=1)
    clock.t += 1.0
    p.update(6)
    p.close()
    text = out.getvalue()
    assert text.startswith("\rstep  5/10 (50.0%) | loss nan | long_name_metric 1 | 0.50 steps/s")
    assert text.endswith("\n") and text.count("\n") == 1 and text.count("\r") == 2
    first, second = text[1:-1].split("\r")
    assert len(second) == len(first)  # shorter line padded to erase the previous one
    assert second.rstrip() == "step  6/10 (60.0%) | 1.00 steps/s | ETA 0:00:04"
