"""flash_rc.outputs under filesystem faults: refused paths, a full disk, a read-only disk, a writer killed midway."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_rc.errors import EXIT_OUTPUT, OutputError
from flash_rc.outputs import atomic_write, output_error, prepare_output_dir, prepare_output_file, sweep_stale_temps


def _tmpfs(path: Path, options: str) -> Path:
    """Mount a tmpfs at ``path`` (root only); skip the test where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB file system, so a real write fails with ENOSPC."""
    yield _tmpfs(tmp_path / "tiny", "size=64k")
    subprocess.run(["umount", str(tmp_path / "tiny")], check=True)


@pytest.fixture
def read_only_disk(tmp_path):
    yield _tmpfs(tmp_path / "ro", "ro,size=64k")
    subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def test_atomic_write_replaces_the_target_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    with atomic_write(target, "w") as f:
        json.dump({"x": 1}, f)
    assert json.loads(target.read_text()) == {"x": 1}
    with atomic_write(target) as f:
        f.write(b"second")
    assert target.read_bytes() == b"second"
    assert list(target.parent.iterdir()) == [target]


def test_a_failed_block_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_an_input_error_inside_the_block_is_not_blamed_on_the_output(tmp_path):
    with pytest.raises(FileNotFoundError) as caught, atomic_write(tmp_path / "out.bin"):
        open(tmp_path / "missing-input.jsonl")
    assert not isinstance(caught.value, OutputError) and list(tmp_path.iterdir()) == []


def test_refused_output_paths_name_the_path_and_the_reason(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}/dir: it is a directory"):
        prepare_output_file(tmp_path / "dir")
    with pytest.raises(OutputError, match=f"{tmp_path}/file is a file, not a directory"):
        prepare_output_file(tmp_path / "file" / "sub" / "out.parquet")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}/file: {tmp_path}/file is a file"):
        prepare_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="is a file, not a directory"), atomic_write(tmp_path / "file" / "x"):
        pass
    assert OutputError.exit_code == EXIT_OUTPUT == 3


def test_prepare_creates_what_is_missing_and_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_output_dir("new/dir") == tmp_path / "new" / "dir" and (tmp_path / "new" / "dir").is_dir()
    assert prepare_output_file("other/out.txt") == tmp_path / "other" / "out.txt"
    assert (tmp_path / "other").is_dir() and not (tmp_path / "other" / "out.txt").exists()


def test_unwritable_directory_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere; the read-only file system test covers this as root")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match=f"cannot write {locked}: permission denied"):
        prepare_output_file(locked / "out.parquet")


def test_read_only_file_system_is_refused(read_only_disk):
    with pytest.raises(OutputError, match=f"cannot write {read_only_disk}: read-only file system"):
        prepare_output_dir(read_only_disk)


def test_full_disk_says_disk_full_and_leaves_nothing(tiny_disk):
    target = tiny_disk / "big.bin"
    with pytest.raises(OutputError, match=f"cannot write {target}: disk full") as caught, atomic_write(target) as f:
        f.write(os.urandom(256 * 1024))
    assert caught.value.errno == errno.ENOSPC and "No such file" not in str(caught.value)
    assert list(tiny_disk.iterdir()) == []


def test_flash_rc_data_on_a_full_disk_is_one_line_exit_3(tiny_disk, tmp_path):
    source = tmp_path / "big.jsonl"  # random text: ~400 KB of parquet that no compression fits into 64 KiB
    source.write_text("".join(json.dumps({"problem": os.urandom(100).hex(), "answer": i}) + "\n" for i in range(2000)))
    command = "import sys; from flash_rc.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", command, "data", "math", "--input", str(source),
                             "--output-dir", str(tiny_disk)], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_OUTPUT
    disk_full = f"cannot write {tiny_disk}/big.parquet: disk full (no space left on device)"
    assert result.stderr == f"flash-rc data: error: {disk_full}\n"
    assert list(tiny_disk.iterdir()) == []


def test_full_disk_simulated_at_fsync(tmp_path, monkeypatch):
    """The same contract without a tmpfs: the disk fills up when the data is flushed to it."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="disk full"), atomic_write(tmp_path / "out.bin") as f:
        f.write(b"data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "quota exceeded"),
                                             (errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                             (errno.ENOTDIR, "not a directory"), (errno.EBUSY, "busy")])
def test_output_error_words(code, words):
    error = output_error("/data/out.parquet", OSError(code, os.strerror(code)))
    assert str(error).startswith("cannot write /data/out.parquet: ") and words in str(error)
    assert error.errno == code and isinstance(error, OSError)


KILLED_WRITER = """
import sys, time
from flash_rc.outputs import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"half of the new content")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_killed_writer_leaves_a_temp_that_the_next_write_sweeps(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"writing\n"
    writer.kill()
    writer.wait()
    writer.stdout.close()
    (temp,) = tmp_path.glob(f".out.bin.flash_rc-tmp-*-{writer.pid}-*.tmp")
    assert target.read_bytes() == b"old"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_sweep_keeps_temps_of_live_writers_and_other_hosts(tmp_path):
    from flash_rc.outputs import _HOST

    live = tmp_path / f".a.flash_rc-tmp-{_HOST}-{os.getpid()}-00ff.tmp"
    elsewhere = tmp_path / ".a.flash_rc-tmp-otherhost-999999999-00ff.tmp"
    not_ours = tmp_path / ".a.tmp"
    for path in (live, elsewhere, not_ours):
        path.write_text("x")
    assert sweep_stale_temps(tmp_path) == []
    assert sweep_stale_temps(tmp_path / "missing") == []
    dead = tmp_path / f".a.flash_rc-tmp-{_HOST}-999999999-00ff.tmp"
    dead.write_text("x")
    assert sweep_stale_temps(tmp_path) == [dead]


def test_only_write_modes():
    with pytest.raises(ValueError, match="mode"), atomic_write("/tmp/never-written", "a"):
        pass
