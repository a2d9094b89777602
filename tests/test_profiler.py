"""md.profiler's bookkeeping under a fake clock (nothing here is timed), and
``minidense.train --profile``."""
import json

import numpy as np
import pytest

import minidense as md
from minidense import backend, profiling


class TickClock:
    """A clock that advances by one second at every reading."""

    def __init__(self):
        self.t = 100.0
        self.readings = 0

    def __call__(self):
        self.t += 1.0
        self.readings += 1
        return self.t


def test_ops_forward_backward_and_kept_bytes_are_recorded():
    a = md.tensor(np.ones((3, 4)), requires_grad=True)      # float64: 96 bytes
    b = md.tensor(np.ones((3, 4)), requires_grad=True)
    with md.profiler(clock=TickClock()) as prof:
        y = a * b                       # Mul keeps a and b
        z = y * b
        loss = (z + y).sum()            # Add and Sum keep shapes only
        loss.backward()
    rows = {r["name"]: r for r in prof.rows()}
    assert set(rows) == {"Mul", "Add", "Sum"}
    # Each forward and each backward reads the clock twice: one tick each.
    assert rows["Mul"]["calls"] == 2 and rows["Mul"]["forward_s"] == 2.0
    assert rows["Mul"]["backward_s"] == 2.0 and rows["Mul"]["total_s"] == 4.0
    assert rows["Mul"]["kept_bytes"] == 4 * 96
    assert rows["Add"]["calls"] == 1 and rows["Add"]["kept_bytes"] == 0
    assert rows["Sum"]["calls"] == 1 and rows["Sum"]["backward_s"] == 1.0
    assert [r["name"] for r in prof.rows()] == ["Mul", "Add", "Sum"]   # most time first


def test_nothing_is_kept_or_recorded_outside_the_profiler_or_without_grad():
    x = md.tensor(np.ones(5), requires_grad=True)
    prof = md.profiler(clock=TickClock())
    (x * 2).sum().backward()            # not recording
    with prof, md.no_grad():
        x * x                           # records its time, keeps nothing
    assert prof.rows()[0]["kept_bytes"] == 0 and prof.rows()[0]["calls"] == 1
    assert len(prof.rows()) == 1 and profiling.active is None


def test_optimizer_step_has_its_own_row_and_regions_enclose_ops():
    w = md.tensor(np.ones(4), requires_grad=True)
    opt = md.optim.SGD([w], lr=0.1, momentum=0.9)
    with md.profiler(clock=TickClock()) as prof:
        with prof.region("step 1", "step"):
            (w * w).sum().backward()
            opt.step()
    rows = {r["name"]: r for r in prof.rows()}
    assert rows["SGD.step"]["calls"] == 1 and rows["SGD.step"]["forward_s"] == 1.0
    assert "step 1" not in rows                       # its ops are already counted
    # Recorded: enter .. exit; every tick not inside an op is "other".
    assert prof.recorded_s == prof.clock.t - 101.0
    table = prof.table()
    assert table.splitlines()[1].split()[0] in ("Mul", "Sum", "SGD.step")
    assert "(other)" in table


def test_chrome_trace_has_complete_events_in_microseconds(tmp_path):
    x = md.tensor(np.ones(5), requires_grad=True)
    with md.profiler(clock=TickClock()) as prof:
        with prof.region("step 1", "step"):
            (x * x).sum().backward()
    trace = json.loads(prof.export_chrome_trace(tmp_path / "t.json").read_text())
    events = trace["traceEvents"]
    assert {(e["name"], e["cat"]) for e in events} == {
        ("Mul", "forward"), ("Sum", "forward"), ("Sum", "backward"), ("Mul", "backward"),
        ("step 1", "step")}
    assert all(e["ph"] == "X" and e["dur"] == 1e6 for e in events if e["cat"] != "step")
    step = next(e for e in events if e["cat"] == "step")
    assert step["ts"] == 1e6   # the first reading (start) is the origin, the region's is next
    assert all(step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]
               for e in events)
    mul = next(e for e in events if e["name"] == "Mul" and e["cat"] == "forward")
    assert mul["args"]["kept_bytes"] == 2 * 5 * 8


def test_entering_again_adds_up_and_two_profilers_cannot_record_at_once():
    x = md.tensor(np.ones(2), requires_grad=True)
    prof = md.profiler(clock=TickClock())
    for _ in range(3):
        with prof:
            x * x
    assert prof.rows()[0]["calls"] == 3
    with prof:
        with pytest.raises(RuntimeError, match="another profiler is already recording"):
            md.profiler().start()


def test_it_waits_for_the_gpu_only_when_asked(monkeypatch):
    waits = []
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(backend, "synchronize", lambda device="cuda": waits.append(device))
    x = md.tensor(np.ones(2), requires_grad=True)
    with md.profiler(clock=TickClock()):
        (x * x).sum().backward()
    assert waits == []
    clock = TickClock()
    with md.profiler(synchronize=True, clock=clock):
        (x * x).sum().backward()
    assert len(waits) == clock.readings and waits[0] == "cuda"


def test_train_profile_writes_the_table_and_the_trace(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")   # the digits demo
    from minidense import train
    monkeypatch.setenv("MINIDENSE_DATA", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["--data", "digits", "--model", "densenet_cifar", "--model-args",
            "depth=10,growth_rate=4,bottleneck=true,compression=0.5", "--subset", "48",
            "--test-subset", "20", "--batch-size", "16", "--epochs", "1", "--no-plot",
            "--profile", "2", "--out", str(out)]
    assert train.main(args) == 0
    table = (out / "profile.txt").read_text()
    assert "2 training steps" in table and "Conv2d" in table and "SGD.step" in table
    events = json.loads((out / "profile-trace.json").read_text())["traceEvents"]
    steps = [e["name"] for e in events if e["cat"] == "step"]
    assert steps == ["epoch 1 step 1", "epoch 1 step 2"]   # 3 steps in the epoch, 2 profiled
    assert {"forward", "backward", "optimizer"} <= {e["cat"] for e in events}
    assert profiling.active is None
