#!/usr/bin/env bash
# Installs axolotl, LLaMA-Factory and torchtune each into its own virtual environment (CPU torch first, the tool
# constrained so it cannot replace torch), installs tam_hf beside it, and checks that
#   1. installing tam_hf changed none of the tool's packages (pip freeze before/after, tam_hf itself aside),
#   2. a tiny offline AdaTAMW training through the tool's own command lowers the loss and logs damping.
# Prints one table row per tool. Not part of CI: the three installs take ~15 minutes and ~8 GB.
#
# usage: scripts/check_integrations.sh [--install-only] [axolotl] [llamafactory] [torchtune]
#   TAM_INTEGRATIONS_VENVS  where the venvs live (default ~/.cache/tam_hf-integrations); a venv that finished
#                           installing is reused, with the install time it recorded
#   TAM_INTEGRATIONS_PYTHON the interpreter for the venvs (default python3; axolotl 0.21+ needs >= 3.12)
# On a machine without a local CPU torch wheel, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index first,
# or pip brings a multi-GB CUDA build.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${TAM_INTEGRATIONS_VENVS:-$HOME/.cache/tam_hf-integrations}
PY=${TAM_INTEGRATIONS_PYTHON:-python3}
TORCH=torch==2.13.0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
install_only=0
tools=()
for a in "$@"; do
    case $a in
        --install-only) install_only=1 ;;
        axolotl|llamafactory|torchtune) tools+=("$a") ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done
[ ${#tools[@]} -gt 0 ] || tools=(axolotl llamafactory torchtune)
mkdir -p "$VENVS"

# --- each tool's install, with the workarounds it needs on CPU --------------------------------------------------
install_axolotl() {  # $1 = venv
    # 0.19.0: the newest release for Python 3.11 (0.21 needs 3.12). It pins transformers 5.16.1, trl 1.9.0, peft 0.20.
    "$1/bin/pip" install -q -c "$1/constraints.txt" axolotl==0.19.0
}
install_llamafactory() {
    # 0.9.5 pins transformers<=5.6, trl<=0.24, accelerate<=1.11, datasets<=4.0 and, unconstrained, replaces torch.
    "$1/bin/pip" install -q -c "$1/constraints.txt" llamafactory==0.9.5
    # Under the torch constraint pip still picks torchvision/torchaudio wheels built for CUDA torch; they fail to
    # import against CPU torch, and transformers then fails on `import torchvision` too. LLaMA-Factory needs
    # neither for text training, but data/mm_plugin.py imports torchaudio at module level: an empty stub module
    # satisfies that import (multimodal audio would not work, text training does).
    "$1/bin/pip" uninstall -q -y torchvision torchaudio
    local site
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$site/torchaudio"
    echo '# stub: see scripts/check_integrations.sh (the CUDA torchaudio wheel does not import on CPU torch)' \
        > "$site/torchaudio/__init__.py"
}
install_torchtune() {
    # 0.6.1 does not pin torch but needs torchao, and only 0.11.0 works with it here: 0.12 fails to import,
    # 0.17 breaks `tune cp`.
    "$1/bin/pip" install -q -c "$1/constraints.txt" torchtune==0.6.1 torchao==0.11.0
}
tool_version() {  # $1 = venv, $2 = tool
    "$1/bin/pip" show "$2" 2>/dev/null | sed -n 's/^Version: //p'
}

ensure_venv() {  # $1 = tool
    local v=$VENVS/$1
    if [ -f "$v/.installed" ]; then return; fi
    rm -rf "$v"
    local t0=$SECONDS
    "$PY" -m venv "$v"
    "$v/bin/pip" install -q "$TORCH"
    echo "$TORCH" > "$v/constraints.txt"
    "install_$1" "$v"
    echo $((SECONDS - t0)) > "$v/.install_seconds"
    touch "$v/.installed"
}

for t in "${tools[@]}"; do
    echo "== installing $t into $VENVS/$t" >&2
    ensure_venv "$t"
done
[ $install_only = 1 ] && exit 0
