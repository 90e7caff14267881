"""Packaging: every package directory is installed, and kernels/ and eval/ only exist under flash_rc."""

import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    for root_name, directory in mapping.items():
        for init in (REPO / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / directory)
            name = ".".join([root_name, *relative.parts])
            assert name in listed, f"{name} ({init.parent}) is missing from [tool.setuptools].packages"


def test_no_top_level_kernels_or_eval_module():
    assert importlib.util.find_spec("flash_rc.kernels").origin.endswith("kernels/__init__.py")
    assert importlib.util.find_spec("flash_rc.eval").origin.endswith("eval/__init__.py")
    # transformers probes HF's `kernels` package by name: ours must not answer to it
    for name in ("kernels", "eval"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not str(spec.origin).startswith(str(REPO)), f"top-level {name!r} resolves to the repo"
