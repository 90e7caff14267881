"""The flash-rc command: subcommand dispatch, and the error contract under bad input, filesystem faults and signals."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flash_rc.cli import main, run_command
from flash_rc.errors import ConfigError, OutputError, RowError


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("decode", "data", "models", "quantize"))
    assert main(["nope"]) == 2


def test_user_mistakes_are_one_line_errors_not_tracebacks(capsys):
    assert main(["decode", "data.path=x"]) == 2
    err = capsys.readouterr().err
    assert "flash-rc decode: error: invalid recipe" in err and "data.path: Extra inputs" in err
    assert "Traceback" not in err
    assert main(["decode", "data.val_files=x.jsonl", "flash_rc.rc.reasoning_prompt=/no/such/template.txt"]) == 2
    assert "prompt template file not found" in capsys.readouterr().err


def test_bad_problem_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{oops\n')
    assert main(["decode", f"data.val_files={bad}"]) == 1  # bad data, not bad usage (flash_rc.errors' table)
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err


# --- The error contract, through the real entry point in a subprocess -------------------------------------------
# Every failure is one line on stderr with the exit status of flash_rc.errors' table (1 bad data, 2 bad usage,
# 3 unwritable output, 128 + N for signal N), no traceback, nothing new on disk, no temporary file left behind.

FLASH_RC = [sys.executable, "-c", "import sys; from flash_rc.cli import main; sys.exit(main())"]  # the console script


def flash_rc(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FLASH_RC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert result.returncode == status, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("flash-rc") and ": error: " in result.stderr and message in result.stderr


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Inputs good and bad, a regular file to write below, and an output directory whose target is a directory."""
    (tmp_path / "ok.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    (tmp_path / "no-problem.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n"
                                               + json.dumps({"answer": "1"}) + "\n")
    (tmp_path / "list-content.jsonl").write_text(json.dumps({
        "data_source": "math_dapo", "prompt": [{"role": "user", "content": ["x"]}],
        "reward_model": {"ground_truth": "1"}}) + "\n")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "taken" / "ok.parquet").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(("args", "status", "message"), [
    (["data", "math", "--input", "missing.jsonl", "--output-dir", "out"], 2, "missing.jsonl: input file not found"),
    (["data", "math", "--input", "corrupt.parquet", "--output-dir", "out"], 1, "not a readable parquet file"),
    (["data", "validate", "corrupt.parquet"], 1, "corrupt.parquet: not a readable parquet file"),
    (["data", "validate", "missing.parquet"], 2, "input file not found"),
    (["data", "math", "--input", "no-problem.jsonl", "--output-dir", "out"], 1, "no-problem.jsonl:2: needs a"),
    (["data", "math", "--input", "list-content.jsonl", "--output-dir", "out", "--dedup"], 1, "list-content.jsonl:1:"),
    (["data", "math", "--input", "deep.json", "--output-dir", "out"], 1, "deep.json: JSON nested too deeply"),
    (["data", "math", "--input", "a-file", "--output-dir", "out"], 1, "a-file: unsupported input type"),
    (["data", "gsm8k", "--train", "gsm8k.jsonl", "--test", "gsm8k.jsonl", "--output-dir", "out"], 1,
     "gsm8k.jsonl:1: field 'answer' has no '#### <number>'"),
    (["data", "gsm8k", "--train", "gsm8k.jsonl", "--output-dir", "out"], 2, "give --input-dir, or both"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--limit", "0"], 2, "limit must be at least 1"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--limit", "-3"], 2, "limit must be at least 1"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--limit", "x"], 2, "invalid int value: 'x'"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--name", "../x"], 2, "plain file name"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--name", "../../x"], 2, "plain file name"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--name", ".."], 2, "plain file name"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "out", "--reasoning360", "--name", "a/b"], 2, "'/'"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "a-file"], 3, "a-file is a file, not a directory"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "a-file/sub"], 3, "a-file is a file, not a directory"),
    (["data", "math", "--input", "ok.jsonl", "--output-dir", "taken"], 3, "taken/ok.parquet: it is a directory"),
    (["data", "bogus"], 2, "invalid choice: 'bogus'"),
    (["data", "math", "--output-dir", "out"], 2, "the following arguments are required: --input"),
    (["models", "no-such-model"], 2, "unknown built-in model 'no-such-model'"),
    (["no-such-command"], 2, "unknown command 'no-such-command'"),
])
def test_bad_input_is_one_line_with_its_exit_status_and_writes_nothing(workdir, args, status, message):
    before = snapshot(workdir)
    assert_one_line_error(flash_rc(*args, cwd=workdir), status, message)
    assert snapshot(workdir) == before


def test_model_cache_below_a_regular_file_is_an_output_error(workdir):
    result = flash_rc("models", "tiny-qwen2", cwd=workdir, env={"FLASH_RC_CACHE": str(workdir / "a-file" / "c")})
    assert_one_line_error(result, 3, "a-file is a file, not a directory")


def test_a_good_run_writes_only_its_output(workdir):
    before = snapshot(workdir)
    result = flash_rc("data", "math", "--input", "ok.jsonl", "--output-dir", "out/train", "--name", "toy",
                      cwd=workdir)
    assert result.returncode == 0 and result.stderr == ""
    assert snapshot(workdir) - before == {workdir / "out", workdir / "out" / "train", workdir / "out/train/toy.parquet"}


SLOW_WRITE = """
import atexit, signal, sys, time
import flash_rc.cli as cli
from flash_rc.outputs import atomic_write

def main(argv):  # a subcommand caught mid-write
    with atomic_write(argv[0]) as f:
        f.write(b"half of the new content")
        print("writing", flush=True)
        time.sleep(120)
    return 0

signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the test runner's parent ignores SIGINT
atexit.register(print, "atexit ran", flush=True)
cli.SUBCOMMANDS["slow"] = ("__main__", "a write that waits to be stopped")
sys.exit(cli.main(["slow", *sys.argv[1:]]))
"""


@pytest.mark.parametrize(("signum", "status", "message"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                           (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_a_signal_mid_write_cleans_up_and_exits_128_plus_n(tmp_path, signum, status, message):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    run = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(target)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "writing\n"
    assert list(tmp_path.glob(".out.bin.flash_rc-tmp-*"))  # the write is under way
    run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == status
    assert stderr == f"flash-rc slow: error: {message}\n"
    assert stdout == "atexit ran\n"  # the process exited normally: atexit handlers ran
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_sigterm_while_reading_input_stops_flash_rc_data(tmp_path):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    run = subprocess.Popen([*FLASH_RC, "data", "math", "--input", str(fifo), "--output-dir", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "w") as writer:  # opens once flash-rc reads it: its SIGTERM handler is installed by then
        writer.write(json.dumps({"problem": "p", "answer": "1"}) + "\n")
        writer.flush()
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 143 and stderr == "flash-rc data: error: terminated (SIGTERM)\n" and stdout == ""
    assert list(tmp_path.iterdir()) == [fifo]


# --- run_command in-process: which error gets which status ------------------------------------------------------

def _raising(error: BaseException):
    def entry(argv):
        raise error
    return entry


@pytest.mark.parametrize(("error", "status", "line"), [
    (RowError("in.jsonl:3: bad row"), 1, "in.jsonl:3: bad row"),
    (ConfigError("bad key"), 2, "bad key"),
    (OutputError("cannot write /o: disk full"), 3, "cannot write /o: disk full"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "in.jsonl"), 2,
     "in.jsonl: no such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device", "/o/x"), 3, "/o/x: disk full (no space left on device)"),
    (KeyboardInterrupt(), 130, "interrupted (SIGINT)"),
])
def test_run_command_maps_errors_to_statuses(capsys, error, status, line):
    assert run_command("x", _raising(error), []) == status
    assert capsys.readouterr().err == f"flash-rc x: error: {line}\n"


def test_a_message_listing_several_problems_keeps_them_under_its_summary(capsys):
    error = ConfigError("invalid recipe (a.yaml):\n  data.path: Extra inputs\n  actor.lr: not a number")
    assert run_command("decode", _raising(error), []) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flash-rc decode: error: invalid recipe (a.yaml):", "  data.path: Extra inputs", "  actor.lr: not a number"]


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command("x", _raising(ZeroDivisionError()), [])


def test_sigterm_handler_is_only_installed_while_a_command_runs():
    before = signal.getsignal(signal.SIGTERM)
    assert main(["models", "--list"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
