#!/usr/bin/env bash
# Creates or updates .venv with everything alchemist-sgl needs, from the package registries only.
# CPU route (no CUDA): CPU torch, sglang without its CUDA-only dependencies (requirements/sglang-cpu*.txt,
# generated from the wheel's metadata by scripts/gen_sglang_cpu_requirements.py), triton, data packages.
# CUDA route: the stock `pip install sglang==0.5.23`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=.venv
# Installs skip pip's byte-compilation, which runs on one core; one parallel compileall over the
# venv follows at the end. The bytecode must exist: this machine sets PYTHONDONTWRITEBYTECODE=1, so
# without it every server process would compile sglang and transformers from source at each start.
PIP_INSTALL=("$VENV/bin/pip" install --no-compile)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "${PIP_INSTALL[@]}" --quiet --upgrade pip wheel setuptools
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA found, stock route"
  "${PIP_INSTALL[@]}" "sglang==0.5.23"
  "${PIP_INSTALL[@]}" -r requirements/dev.txt
else
  echo "setup: no CUDA, CPU route"
  "${PIP_INSTALL[@]}" -c requirements/cpu-constraints.txt "torch==2.13.0"
  "${PIP_INSTALL[@]}" --no-deps "sglang==0.5.23"
  # The checked-in list must match what the wheel's metadata says today.
  tmp="$(mktemp -d)"
  "$VENV/bin/python" scripts/gen_sglang_cpu_requirements.py --out-dir "$tmp" >/dev/null
  if ! diff -q "$tmp/sglang-cpu.txt" requirements/sglang-cpu.txt >/dev/null; then
    echo "setup: requirements/sglang-cpu.txt is stale; regenerate with scripts/gen_sglang_cpu_requirements.py" >&2
    exit 1
  fi
  rm -rf "$tmp"
  "${PIP_INSTALL[@]}" -r requirements/sglang-cpu.txt -c requirements/cpu-constraints.txt "triton==3.7.1"
  "${PIP_INSTALL[@]}" --no-deps -r requirements/sglang-cpu-nodeps.txt -r requirements/nodeps.txt
  "${PIP_INSTALL[@]}" -r requirements/dev.txt -c requirements/cpu-constraints.txt
  # CPU venv only: the stand-ins in patches/cpu (sgl_kernel, torchvision) are importable by every
  # python of this venv, so `python -m sglang.benchmark.serving` and SGLang's own tools run as is.
  echo "$(pwd)/patches/cpu" > "$site/alchemist_cpu_stand_ins.pth"
fi
"${PIP_INSTALL[@]}" --quiet --no-deps -e .
# -j 0: every core. A few files that only another Python version parses (a test helper in torch
# for 3.12) fail here as they do under pip, which skips them too: the status is not the check.
"$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
"$VENV/bin/python" - "$site" <<'PY'
import pathlib, sys
site = pathlib.Path(sys.argv[1])
missing = [p for p in (site / "sglang" / "srt" / "server_args.py", site / "transformers" / "__init__.py",
                       site / "torch" / "__init__.py")
           if not any(p.parent.glob(f"__pycache__/{p.stem}.cpython-*.pyc"))]
if missing:
    raise SystemExit(f"setup: no bytecode for {missing}")
print("setup: bytecode compiled")
PY
"$VENV/bin/python" -c "import torch; print('setup: torch', torch.__version__)"
