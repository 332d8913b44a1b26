#!/usr/bin/env bash
# Set up tunelab in ./.venv: PyTorch (CPU build unless a CUDA GPU is present or torch is already
# installed), then tunelab itself. Safe to run again; it only installs what is missing.
#   bash scripts/setup.sh          # to use tunelab
#   bash scripts/setup.sh --dev    # also the test tools
# TUNELAB_TORCH="torch==X.Y.Z" overrides the torch requirement; PYTHON=python3.11 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_spec="${TUNELAB_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed; keeping it"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "CUDA GPU found: installing the default (CUDA) build of $torch_spec"
  "${pip[@]}" install "$torch_spec"
elif "${pip[@]}" install -q --no-index --no-deps "$torch_spec" 2>/dev/null; then
  # A wheel in pip's local sources (find-links) was found without touching the network: on
  # machines prepared for tunelab that is the CPU build. Now add its dependencies.
  echo "no GPU: installed $torch_spec from the local wheel source"
  "${pip[@]}" install -q "$torch_spec"
else
  # No GPU and no local wheel: take the CPU build from PyTorch's own index, so pip never
  # pulls the multi-GB CUDA wheels by accident.
  echo "no GPU: installing the CPU build of $torch_spec from PyTorch's CPU index"
  "${pip[@]}" install "$torch_spec" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi

"${pip[@]}" install -q -e ".${extras}"
if [ -n "$extras" ]; then
  # k-diffusion (A1111's samplers) is a reference for the sampling tests. Its declared
  # dependencies include torchvision, which would replace the CPU torch with a CUDA build: take
  # the package and the two small libraries its sampler code imports, nothing else.
  "${pip[@]}" install -q --no-deps "k-diffusion==0.1.1.post1" "torchsde==0.2.6" "torchdiffeq==0.2.5" "trampoline==0.1.2" scipy
  bash scripts/install-browser.sh  # the report's browser test
fi
echo "tunelab ready: $(.venv/bin/tunelab --version)   (activate with: source .venv/bin/activate)"
