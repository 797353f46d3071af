#!/usr/bin/env bash
# Installs axolotl, LLaMA-Factory and torchtune each into its own virtual environment (CPU torch first, the tool
# constrained so it cannot replace torch), installs tam_hf beside it, and checks that
#   1. installing tam_hf changed none of the tool's packages (pip freeze before/after, tam_hf itself aside),
#   2. a tiny offline AdaTAMW training through the tool's own command lowers the loss and logs damping.
# Prints one table row per tool. Not part of CI: the three installs take ~15 minutes and ~8 GB.
#
# usage: scripts/check_integrations.sh [--install-only] [axolotl] [llamafactory] [llamafactory_v1] [torchtune]
#   llamafactory_v1: LLaMA-Factory's v1 trainer, in the llamafactory venv (its logs have no damping: not asked)
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
        axolotl|llamafactory|llamafactory_v1|torchtune) tools+=("$a") ;;
        *) echo "unknown argument: $a" >&2; exit 2 ;;
    esac
done
[ ${#tools[@]} -gt 0 ] || tools=(axolotl llamafactory llamafactory_v1 torchtune)
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

# --- each tool's tiny offline AdaTAMW training: the first comment line of its example config -------------------
# Run in a scratch folder holding ./tam_tiny (python -m tam_hf.integrations.example tam_tiny) and a link to
# recipes/, so the command is the documented one, letter for letter.
COMMAND_axolotl="axolotl train recipes/integrations/axolotl_adatamw.yml --launcher python"
COMMAND_llamafactory="python -m tam_hf.run llamafactory-cli train recipes/integrations/llamafactory_adatamw.yaml"
COMMAND_llamafactory_v1="python -m tam_hf.integrations.llamafactory train recipes/integrations/llamafactory_v1_adatamw.yaml"
COMMAND_torchtune="tune run full_finetune_single_device --config recipes/integrations/torchtune_adatamw.yaml"
# axolotl sends usage statistics to a remote host unless told not to: offline, seconds of retries at every step.
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1

# The losses and damping a log shows, from the Trainer's dict lines ({'loss': '5.178', ..., 'damping/mean': ...})
# and torchtune's DiskLogger lines (Step 5 | loss:5.17 ... damping/mean:0.51 ...).
read_log() {  # $1 = log file -> "first_loss last_loss damping_lines"
    python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
number = r"['\"]?\s*[:=]\s*['\"]?(-?[0-9][0-9.eE+-]*)"
losses = [float(x) for x in re.findall(r"(?<![\w/])['\"]?loss" + number, text)]
damping = re.findall(r"damping/mean" + number, text)
print(f"{losses[0] if losses else float('nan'):.3f} {losses[-1] if losses else float('nan'):.3f} {len(damping)}")
PY
}

if [ $install_only = 1 ]; then
    for t in "${tools[@]}"; do echo "== ${t%_v1}: installing into $VENVS/${t%_v1}" >&2; ensure_venv "${t%_v1}"; done
    exit 0
fi
rows=()
failed=0
for t in "${tools[@]}"; do
    tool=${t%_v1}
    echo "== $tool: installing into $VENVS/$tool" >&2
    ensure_venv "$tool"
    v=$VENVS/$tool
    # Item 2 of the check: installing tam_hf changes nothing that the tool installed.
    "$v/bin/pip" uninstall -q -y tam_hf >/dev/null 2>&1 || true
    "$v/bin/pip" freeze --exclude tam_hf | sort > "$v/freeze-before.txt"
    "$v/bin/pip" check > "$v/check-before.txt" 2>&1 || true
    "$v/bin/pip" install -q -c "$v/constraints.txt" "$REPO" >&2
    "$v/bin/pip" freeze --exclude tam_hf | sort > "$v/freeze-after.txt"
    "$v/bin/pip" check > "$v/check-after.txt" 2>&1 || true
    changed=$(diff "$v/freeze-before.txt" "$v/freeze-after.txt" | grep -c '^[<>]' || true)
    if [ "$changed" != 0 ]; then
        echo "!! $t: installing tam_hf changed packages:" >&2
        diff "$v/freeze-before.txt" "$v/freeze-after.txt" >&2 || true
    fi
    if ! diff -q "$v/check-before.txt" "$v/check-after.txt" >/dev/null; then
        echo "!! $t: pip check changed:" >&2
        diff "$v/check-before.txt" "$v/check-after.txt" >&2 || true
        changed="$changed+check"
    fi

    echo "== $t: training" >&2
    work=$(mktemp -d)
    log=$v/train-$t.log
    cmd_var=COMMAND_$t
    ln -s "$REPO/recipes" "$work/recipes"
    set +e
    (cd "$work" && export PATH="$v/bin:$PATH" && python -m tam_hf.integrations.example tam_tiny >/dev/null &&
        ${!cmd_var}) > "$log" 2>&1
    rc=$?
    cat "$work"/tam_tiny/*_out/logs/*.txt >> "$log" 2>/dev/null  # torchtune's DiskLogger writes there
    set -e
    read -r first last damping < <(read_log "$log")
    want_damping=1
    [ "$t" = llamafactory_v1 ] && want_damping=0
    ok=$(python3 -c "import sys; f, l, d, want, rc, ch = sys.argv[1:]
print('yes' if rc == '0' and float(l) < float(f) and (int(d) > 0 or want == '0') and ch == '0' else 'NO')" \
        "$first" "$last" "$damping" "$want_damping" "$rc" "$changed")
    [ "$ok" = yes ] || { failed=1; echo "!! $t failed (exit $rc); log: $log" >&2; tail -20 "$log" >&2; }
    seen="$damping log lines"
    [ $want_damping = 0 ] && seen="not asked (v1 logs take no additions)"
    rows+=("| $t | $(tool_version "$v" "$tool") | \`${!cmd_var}\` | $first -> $last | $seen | $(cat "$v/.install_seconds") s | $changed | $ok |")
    rm -rf "$work"
done

echo
echo "| tool | version | command | loss first -> last | damping/mean logged | install time | packages changed by pip install tam_hf | passed |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
