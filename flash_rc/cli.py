"""The ``flash-rc`` command: one entry point, one subcommand per job.

Subcommand modules are imported only when used, so ``flash-rc models`` does not pay for importing vLLM.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "decode": ("flash_rc.rc.decode", "RC decoding over a problem file, accuracy per cycle"),
    "data": ("flash_rc.data.cli", "convert GSM8K / math datasets to verl parquet rows, validate files"),
    "models": ("flash_rc.models", "build / list the offline built-in models"),
    "quantize": ("flash_rc.rollout.checkpoint", "export an INT8/FP8 compressed-tensors W8A8 checkpoint from bf16"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: flash-rc <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    import importlib

    from flash_rc.config import ConfigError
    from flash_rc.data.rows import RowError
    from flash_rc.models import ModelNotFoundError
    from flash_rc.rc.prompts import TemplateError

    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:])
    except (ConfigError, TemplateError, ModelNotFoundError, RowError, FileNotFoundError) as error:
        # mistakes in what the user asked for: the message says what to fix, a traceback would only hide it
        print(f"flash-rc {argv[0]}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
