"""MetricsLogger: the durable metrics.jsonl (per step, NaN as null, resume truncation, disk full) and its views."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time

import pytest

from flash_rc.backends.local import metrics as metrics_module
from flash_rc.backends.local.metrics import MetricsLogger, console_line
from flash_rc.errors import ConfigError, OutputError, RowError


def make_logger(run_dir, loggers=(), **kwargs) -> MetricsLogger:
    return MetricsLogger(list(loggers), project_name="flash-rc-tests", experiment_name="unit", run_dir=run_dir,
                         **kwargs)


def read_records(run_dir) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"{constant} is not valid JSON")

    text = (run_dir / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_each_step_is_one_line_on_disk_before_the_next_step(tmp_path):
    with make_logger(tmp_path) as metrics:
        metrics.log(1, {"critic/rewards/mean": 0.5, "actor/pg_loss": -0.25})
        # read while the logger is open: the line is already written (what a killed run would leave)
        assert read_records(tmp_path) == [{"step": 1, "critic/rewards/mean": 0.5, "actor/pg_loss": -0.25}]
        metrics.log(2, {"critic/rewards/mean": 0.75})
        assert read_records(tmp_path)[1] == {"step": 2, "critic/rewards/mean": 0.75}
    assert len(read_records(tmp_path)) == 2


def test_non_finite_values_are_written_as_null(tmp_path):
    with make_logger(tmp_path) as metrics:
        metrics.log(0, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1})
    assert read_records(tmp_path) == [{"step": 0, "a": None, "b": None, "c": None, "d": 1.0}]


def test_steps_must_increase_and_step_is_not_a_metric_name(tmp_path):
    with make_logger(tmp_path) as metrics:
        metrics.log(3, {"a": 1.0})
        with pytest.raises(ValueError, match="step 3 logged after step 3"):
            metrics.log(3, {"a": 2.0})
        with pytest.raises(ValueError, match="'step'"):
            metrics.log(4, {"step": 4.0})
    assert read_records(tmp_path) == [{"step": 3, "a": 1.0}]


def test_resume_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    with make_logger(tmp_path) as metrics:
        for step in range(1, 5):
            metrics.log(step, {"a": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "a"')  # a write the kill interrupted
    with make_logger(tmp_path, resume_step=2) as metrics:
        assert read_records(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
        with pytest.raises(ValueError, match="step 2 logged after step 2"):
            metrics.log(2, {"a": 20.0})
        metrics.log(3, {"a": 30.0})
    assert [(r["step"], r["a"]) for r in read_records(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the atomic rewrite left no temporary file


def test_a_fresh_run_starts_an_empty_record_and_a_resume_without_one_starts_one(tmp_path):
    with make_logger(tmp_path) as metrics:
        metrics.log(1, {"a": 1.0})
    make_logger(tmp_path).close()
    assert read_records(tmp_path) == []
    with make_logger(tmp_path / "moved", resume_step=7) as metrics:
        metrics.log(8, {"a": 8.0})
    assert read_records(tmp_path / "moved") == [{"step": 8, "a": 8.0}]


def test_resume_refuses_a_corrupt_line_before_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RowError, match="metrics.jsonl line 2"):
        make_logger(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'  # left untouched
    make_logger(tmp_path).close()  # a fresh run does not read the old record, it replaces it
    assert read_records(tmp_path) == []


def test_console_line_shows_the_key_metrics_in_fixed_formats():
    metrics = {"critic/rewards/mean": 0.51249, "critic/acc/mean": 0.5, "response_length/mean": 811.6,
               "actor/pg_loss": -0.012345, "actor/grad_norm": 0.84, "actor/lr": 1e-6, "rollout_corr/kl": 3.2e-4,
               "sync/seconds": 1.234, "timing_s/step": 45.67, "perf/rollout_tokens_per_s": 9999.0}
    # 0.51249 -> 0.512; 811.6 -> 812; -0.012345 -> -0.0123; 1.234 s -> 1.23s; 45.67 s -> 45.7s; perf/* not shown
    assert console_line(12, metrics) == ("step 12 | reward 0.512 | acc 0.500 | len 812 | pg_loss -0.0123 | "
                                         "grad_norm 0.840 | lr 1.00e-06 | mismatch_kl 3.20e-04 | sync 1.23s | "
                                         "time 45.7s")
    # missing metrics are left out; a NaN reads as nan
    assert console_line(3, {"actor/grad_norm": math.nan, "sync/seconds": 0.5}) == "step 3 | grad_norm nan | sync 0.50s"


def test_console_prints_one_line_per_step(tmp_path, capsys):
    with make_logger(tmp_path, ["console"]) as metrics:
        metrics.log(1, {"critic/rewards/mean": 0.25})
        metrics.log(2, {"critic/rewards/mean": 0.125})
    assert capsys.readouterr().out == "step 1 | reward 0.250\nstep 2 | reward 0.125\n"


@pytest.mark.parametrize("name", ["mlflow", "jsonl", "Console"])
def test_an_unknown_logger_is_refused_naming_the_accepted_ones(tmp_path, name):
    with pytest.raises(ConfigError, match=f"trainer.logger '{name}' is not supported; accepted: console, wandb, "
                                          f"tensorboard, file"):
        make_logger(tmp_path / "run", ["console", name])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_file_names_the_record_itself_and_a_plain_string_is_one_name(tmp_path, capsys):
    with MetricsLogger("file", project_name="p", experiment_name="e", run_dir=tmp_path) as metrics:
        metrics.log(1, {"a": 1.0})
    assert read_records(tmp_path) == [{"step": 1, "a": 1.0}] and capsys.readouterr().out == ""


def test_a_missing_package_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=r"trainer.logger 'wandb' needs the wandb package \(pip install wandb\)"):
        make_logger(tmp_path, ["wandb"])


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep wandb out of $HOME
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb


def wandb_log_holds(path, *fragments: bytes, timeout_s: float = 60.0) -> bool:
    """Whether wandb's offline log comes to hold every fragment: its service process may still be writing the file
    when ``finish()`` has returned (seen on a loaded 2-core machine), so wait for it a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes()
        if all(fragment in data for fragment in fragments) or time.monotonic() > deadline:
            return all(fragment in data for fragment in fragments)
        time.sleep(0.2)


def test_wandb_offline_writes_its_run_and_a_resume_continues_the_same_run(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    with make_logger(run_dir, ["wandb"], config={"trainer": {"total_epochs": 1}}) as metrics:
        metrics.log(1, {"critic/rewards/mean": 0.625})
    run_id = (run_dir / "wandb_id").read_text().strip()
    (first_log,) = run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")
    # the history record holds the key and the value as JSON text
    assert wandb_log_holds(first_log, b"critic/rewards/mean", b"0.625")

    with make_logger(run_dir, ["wandb"], resume_step=1) as metrics:
        metrics.log(2, {"critic/rewards/mean": 0.875})
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    # the resumed half is a second offline log of the same run id (wandb sync merges them)
    (second_log,) = set(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")) - {first_log}
    assert wandb_log_holds(second_log, b"0.875")
    assert read_records(run_dir) == [{"step": 1, "critic/rewards/mean": 0.625},
                                     {"step": 2, "critic/rewards/mean": 0.875}]

    make_logger(run_dir, ["wandb"]).close()  # a fresh run is a new wandb run
    assert (run_dir / "wandb_id").read_text().strip() != run_id


def tensorboard_scalars(run_dir, tag) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_scalars_read_back_and_a_resume_hides_the_stale_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    with make_logger(tmp_path, ["tensorboard"]) as metrics:
        for step, reward in [(1, 0.25), (2, 0.5), (3, 0.75)]:
            metrics.log(step, {"critic/rewards/mean": reward})
    assert tensorboard_scalars(tmp_path, "critic/rewards/mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]

    with make_logger(tmp_path, ["tensorboard"], resume_step=1) as metrics:
        metrics.log(2, {"critic/rewards/mean": 0.125})
    # steps 2 and 3 of the killed trajectory are purged; the resumed step 2 replaces them
    assert tensorboard_scalars(tmp_path, "critic/rewards/mean") == [(1, 0.25), (2, 0.125)]


def test_a_failing_view_is_disabled_with_one_warning_and_the_record_goes_on(tmp_path, monkeypatch, caplog, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def add_scalar(self, tag, value, step):
        calls.append(step)
        if step >= 2:
            raise RuntimeError("event file gone")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    with caplog.at_level(logging.WARNING, logger=metrics_module.__name__), \
            make_logger(tmp_path, ["console", "tensorboard"]) as metrics:
        for step in (1, 2, 3):
            metrics.log(step, {"critic/rewards/mean": 0.5})
    assert calls == [1, 2]  # not called again after it failed
    (warning,) = [r for r in caplog.records if r.name == metrics_module.__name__]
    assert warning.getMessage() == ("metrics logger 'tensorboard' failed at step 2 and is disabled for the rest of "
                                    "the run: RuntimeError: event file gone")
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2, 3]
    assert capsys.readouterr().out.count("reward 0.500\n") == 3  # the other view goes on too


def test_a_full_disk_raises_output_error_and_leaves_no_torn_line(tmp_path, monkeypatch):
    with make_logger(tmp_path) as metrics:
        metrics.log(1, {"a": 1.0})

        def full_disk(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(OutputError, match=r"cannot write .*metrics.jsonl: disk full") as raised:
            metrics.log(2, {"a": 2.0})
        monkeypatch.undo()
        assert raised.value.errno == errno.ENOSPC and metrics.last_step == 1
        metrics.log(2, {"a": 2.0})  # the step was not recorded, so it can be logged once the disk has room
    assert read_records(tmp_path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]


def test_log_after_close_is_refused(tmp_path):
    metrics = make_logger(tmp_path)
    metrics.close()
    metrics.close()  # idempotent
    with pytest.raises(ValueError, match="after close"):
        metrics.log(1, {"a": 1.0})
