"""``python -m flash_rc.backends.local --config RECIPE [key=value ...]``: ``flash-rc train``, e.g. under torchrun
(``torchrun --nproc_per_node N -m flash_rc.backends.local ...``). Like ``flash-rc train`` it re-executes once with
the engine's libraries preloaded (``flash_rc.launch``)."""

import sys

from flash_rc.cli import run_command
from flash_rc.launch import reexec_with_preload

if __name__ == "__main__":
    reexec_with_preload("flash_rc.backends.local", sys.argv[1:])
    from flash_rc.backends.local.trainer import main

    sys.exit(run_command("train", main, sys.argv[1:]))
