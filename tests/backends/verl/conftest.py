"""Fixtures for the verl tests: verl's platform layer on a CPU-only machine, and verl's process hooks made test-safe.

verl 0.9.1 has no CPU platform: on a machine without a GPU it falls back to its CUDA platform, whose device module is
``torch.cuda`` — every ``synchronize()`` in verl's bucketed weight transfer would then fail. verl's documented way to
support other hardware is to register a ``PlatformBase`` subclass (``PlatformRegistry.register``); we register a CPU
one for the test process. It reports no IPC support, so the transfer takes verl's shared-memory path (the one verl
uses on NPUs without IPC); the CUDA-IPC path needs a GPU.

These fixtures import verl lazily: in the main environment (no verl) the test modules skip before any fixture runs.
"""

from __future__ import annotations

import contextlib
import os
import types

import pytest


def _cpu_platform_class():
    import torch
    from verl.plugin.platform.platform_base import PlatformBase

    cpu_device = types.ModuleType("verl_test_cpu_device")  # the torch.<device> namespace verl calls into
    cpu_device.synchronize = lambda device=None: None  # CPU ops are synchronous
    cpu_device.empty_cache = lambda: None
    cpu_device.current_device = lambda: 0
    cpu_device.device_count = lambda: 1
    cpu_device.is_available = lambda: True
    cpu_device.manual_seed = cpu_device.manual_seed_all = torch.manual_seed

    class PlatformCPU(PlatformBase):
        """verl platform for a CPU-only test process (vLLM runs on its CPU backend)."""

        device_name = "cpu"
        vendor_name = "cpu"
        device_module = cpu_device

        def is_available(self) -> bool:
            return True

        def current_device(self) -> int:
            return 0

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    return PlatformCPU


@pytest.fixture(scope="session", autouse=True)
def verl_platform():
    """verl's platform for this process: its CUDA platform on a GPU machine, the CPU platform above otherwise."""
    import torch
    from verl.plugin.platform.platform_manager import PlatformRegistry, get_platform, set_platform

    if not torch.cuda.is_available():
        platform_class = PlatformRegistry.register(platform="cpu")(_cpu_platform_class())
        set_platform(platform_class())
    return get_platform()


@pytest.fixture(scope="session")
def death_signal_calls():
    """verl's extension ``__new__`` arms ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (and kills the process outright if its
    parent is init) for vLLM's worker *subprocess*. Our engine runs the worker in the pytest process, so we record the
    call instead of arming it on pytest — the record also proves the base ``__new__`` ran."""
    from verl.workers.rollout.vllm_rollout import utils as verl_vllm_utils

    calls: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verl_vllm_utils, "set_death_signal", lambda: calls.append(os.getpid()))
        yield calls


@pytest.fixture(scope="session")
def zmq_job_id():
    """A Ray job id of our own, so the worker's ZMQ socket path cannot collide with a real verl job on this host."""
    with pytest.MonkeyPatch.context() as patch:
        job_id = f"flash-rc-test-{os.getpid()}"
        patch.setenv("VERL_RAY_JOB_ID", job_id)
        yield job_id
