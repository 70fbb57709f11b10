#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared command per stage, for a short lease of one GPU machine.
#
#   bench/gpu_check.sh OUT layer      # CUDA tests of the kernels + the no-sync test, bench/bench_gpu.py (the loss
#                                     # layer beside Liger, chunk sweep), bench/bench_kernels.py (the kernels alone
#                                     # over launch configurations) (~6-8 min)
#   bench/gpu_check.sh OUT distill    # bench/bench_gpu_distill.py: tailkd distill end to end (~4-6 min)
#   DRY=1 bench/gpu_check.sh OUT all  # CPU dry run of both stages at tiny sizes (Triton interpreted; minutes)
#
# Runs in the repository root with nothing of ours installed: tailkd is imported from src/. Wheels in .whl/ (at
# least liger-kernel, for the side-by-side Liger cells) are installed into /tmp/site first; prepare them once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
# (.whl/ is git-ignored; name it in the device tool's `carry`). Everything that comes back lands in OUT as at most
# 8 plain files per stage, no sub-folders: check.log (this script's whole output), tests.log, gpu_kernels.{json,md},
# gpu_loss_layer.{json,md} (layer); gpu_distill.{json,md} and gpu_distill_runs.tar.gz (each run's log, metrics,
# summary and config) (distill).
# A PYTHONPATH set by the caller is kept after these (e.g. a numpy < 2.4 for a dry run under triton 3.6, whose
# interpreter fails on numpy >= 2.4; tests/conftest.py triton_interpreter_problem).
# Exit status: non-zero when a test fails, a benchmark cell is missing or errs, or a stage is unknown.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT layer|distill|all}
stage=${2:-all}
mkdir -p "$out"
exec > >(tee -a "$out/check.log") 2>&1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu_check: no .whl/ wheels: the Liger cells will be reported missing"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
date -u; "$py" - <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
try:
    import triton; print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
status=0

if [[ $stage == layer || $stage == all ]]; then
    echo "== tests: kernels (compiled on CUDA, interpreted on the CPU) and the no-sync step"
    "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_no_sync.py > "$out/tests.log" 2>&1 \
        || status=1
    tail -n 15 "$out/tests.log"
    # the loss layer beside Liger first: the issue's headline figures come back even if the lease ends in the sweep
    echo "== the loss layer side by side (bench/bench_gpu.py)"
    if [[ ${DRY:-0} == 1 ]]; then
        "$py" bench/bench_gpu.py --device cpu --tokens 64 --vocab 1000 --hidden 64 --allow-missing --sweep-chunks 16 64 \
            --out "$out/gpu_loss_layer" || status=1
    else
        "$py" bench/bench_gpu.py --out "$out/gpu_loss_layer" || status=1
    fi
    echo "== the row kernels alone over launch configurations (bench/bench_kernels.py)"
    if [[ ${DRY:-0} == 1 ]]; then
        "$py" bench/bench_kernels.py --device cpu --rows 4 --vocab 1000 --configs 128x4 --out "$out/gpu_kernels" \
            || status=1
    else
        "$py" bench/bench_kernels.py --out "$out/gpu_kernels" || status=1
    fi
fi

if [[ $stage == distill || $stage == all ]]; then
    echo "== tailkd distill end to end (bench/bench_gpu_distill.py)"
    work=$(mktemp -d)
    if [[ ${DRY:-0} == 1 ]]; then
        "$py" bench/bench_gpu_distill.py --device cpu --tiny --out "$work/gd" || status=1
    else
        "$py" bench/bench_gpu_distill.py --out "$work/gd" || status=1
    fi
    for f in results.json results.md; do
        [[ -f $work/gd/$f ]] && cp "$work/gd/$f" "$out/gpu_distill.${f#results.}"
    done
    tar -czf "$out/gpu_distill_runs.tar.gz" -C "$work" gd && rm -rf "$work"
fi

if [[ $stage != layer && $stage != distill && $stage != all ]]; then
    echo "gpu_check: unknown stage '$stage' (layer, distill or all)"; exit 2
fi
echo "gpu_check: stage $stage finished with status $status"
exit $status
