#!/usr/bin/env bash
# The GPU checks of issue 12 as one prepared command per stage, for a short lease of one GPU machine.
#
#   bench/gpu_check.sh OUT layer      # CUDA tests of the kernels + the no-sync test, bench/bench_gpu.py (the loss
#                                     # layer beside Liger, chunk sweep), bench/bench_kernels.py (the kernels alone
#                                     # over launch configurations) (~2.5 min on an H200)
#   bench/gpu_check.sh OUT distill    # bench/bench_gpu_distill.py: tailkd distill end to end (~6.5 min: 5 runs)
#   bench/gpu_check.sh OUT lease      # what fits one 10-minute device call, each part time-boxed, by priority:
#                                     # the loss layer beside Liger (and beside the old single kernel launch and
#                                     # TAD's two-stage pass 1), torch.profiler's table of a kd and a tad step and
#                                     # the head matmuls alone (box 135 s), the same N as 4 rows of 2048 tokens
#                                     # (box 65 s; its table appended to gpu_loss_layer.md), the kernels alone at
#                                     # the per-pass default, 2048 x 8 and 1024 x 4 (box 80 s; with the two-stage
#                                     # rows), the CUDA tests (box 210 s; 119 tests took ~160 s on 2026-12-04,
#                                     # compiles included; ~146 now), tailkd distill fused with what is left (kd
#                                     # and tad from 255 s, tad alone from 150 s; teacher ~22 s + ~105 s per run
#                                     # on 2026-12-04, 6 s of it the 8 steps; the dense runs' figures stand: their
#                                     # path has no kernels): ~9.5 min in all
#   DRY=1 bench/gpu_check.sh OUT all  # CPU dry run of both stages at tiny sizes (Triton interpreted; minutes)
#
# Runs in the repository root with nothing of ours installed: tailkd is imported from src/. Wheels in .whl/ (at
# least liger-kernel, for the side-by-side Liger cells) are installed into /tmp/site first; prepare them once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
# (.whl/ is git-ignored; name it in the device tool's `carry`). Everything that comes back lands in OUT as at most
# 8 plain files per stage, no sub-folders: check.log (this script's whole output), tests.log, gpu_kernels.{json,md},
# gpu_loss_layer.{json,md} (layer); gpu_distill.{json,md} and gpu_distill_runs.tar.gz (each run's log, metrics,
# summary and config) (distill); lease: all of these but gpu_kernels.json. A part stopped by its time box says so in
# check.log, which has every finished cell's line either way.
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
t_start=$SECONDS

# box SECONDS CMD...: CMD, stopped (SIGTERM, then SIGKILL 5 s later) after SECONDS when that is given (not empty)
box() {
    local limit=$1; shift
    [[ -z $limit ]] && { "$@"; return; }
    timeout -k 5 "$limit" "$@"; local rc=$?
    ((rc == 124 || rc == 137)) && echo "gpu_check: stopped by its ${limit} s time box: $*"
    return $rc
}
run_tests() {  # [time box]
    echo "== tests: kernels (compiled on CUDA, interpreted on the CPU) and the no-sync step"
    box "${1:-}" "$py" -m pytest -v -p no:cacheprovider tests/test_kernels.py tests/test_no_sync.py > "$out/tests.log" 2>&1 \
        || status=1
    tail -n 15 "$out/tests.log"
}
run_layer() {  # [time box]; the loss layer beside Liger, then the chunk sweep
    echo "== the loss layer side by side (bench/bench_gpu.py)"
    if [[ ${DRY:-0} == 1 ]]; then
        box "${1:-}" "$py" bench/bench_gpu.py --device cpu --tokens 64 --vocab 1000 --hidden 64 --allow-missing \
            --sweep-chunks 16 64 --profile --out "$out/gpu_loss_layer" || status=1
    else
        # Liger at 2048 tokens: its fastest measured chunk on the H200 (45.2 ms; 1024: 50.0), as in RESULTS.md
        box "${1:-}" "$py" bench/bench_gpu.py --profile --liger-chunk 2048 --out "$out/gpu_loss_layer" || status=1
    fi
}
run_layer_rows() {  # [time box]; the same N as 4 rows of 2048 tokens (training's rows: whole-row chunks of 2048)
    echo "== the loss layer at 4 rows of 2048 tokens (bench/bench_gpu.py --rows 4)"
    local prefix; prefix=$(mktemp -d)/rows  # its table is appended to gpu_loss_layer.md (8 files come back at most)
    local methods=(--methods tailkd_dense tailkd_fused_triton tailkd_fused_triton_two_stage liger --sweep-chunks)
    if [[ ${DRY:-0} == 1 ]]; then
        box "${1:-}" "$py" bench/bench_gpu.py --device cpu --tokens 64 --rows 4 --vocab 1000 --hidden 64 \
            --allow-missing "${methods[@]}" --out "$prefix" || status=1
    else
        box "${1:-}" "$py" bench/bench_gpu.py --rows 4 --liger-chunk 2048 "${methods[@]}" --out "$prefix" || status=1
    fi
    [[ -f $prefix.md ]] && { printf '\n## 4 rows of 2048 tokens (--rows 4)\n\n'; cat "$prefix.md"; } >> "$out/gpu_loss_layer.md"
}
run_kernels() {  # [time box] [json kept: 1 (default) or 0] [launches...: bench_kernels --configs]
    echo "== the row kernels alone over launch configurations (bench/bench_kernels.py)"
    local prefix=$out/gpu_kernels
    [[ ${2:-1} == 0 ]] && prefix=$(mktemp -d)/gpu_kernels
    local configs=(); (($# > 2)) && configs=(--configs "${@:3}")
    if [[ ${DRY:-0} == 1 ]]; then
        box "${1:-}" "$py" bench/bench_kernels.py --device cpu --rows 4 --vocab 1000 --configs default 128x4 --out "$prefix" \
            || status=1
    else
        box "${1:-}" "$py" bench/bench_kernels.py "${configs[@]}" --out "$prefix" || status=1
    fi
    [[ -f $prefix.md && $prefix != "$out/gpu_kernels" ]] && cp "$prefix.md" "$out/gpu_kernels.md"
}
run_distill() {  # [time box] [cells...]
    echo "== tailkd distill end to end (bench/bench_gpu_distill.py)"
    local limit=${1:-}; shift || true
    local only=(); (($#)) && only=(--only "$@" --run-timeout 125)
    local work; work=$(mktemp -d)
    if [[ ${DRY:-0} == 1 ]]; then
        box "$limit" "$py" bench/bench_gpu_distill.py --device cpu --tiny "${only[@]}" --out "$work/gd" || status=1
    else
        box "$limit" "$py" bench/bench_gpu_distill.py "${only[@]}" --out "$work/gd" || status=1
    fi
    for f in results.json results.md; do
        [[ -f $work/gd/$f ]] && cp "$work/gd/$f" "$out/gpu_distill.${f#results.}"
    done
    tar -czf "$out/gpu_distill_runs.tar.gz" -C "$work" gd && rm -rf "$work"
}

case $stage in
    layer) run_tests; run_layer; run_layer_rows; run_kernels ;;  # the layer beside Liger before the sweeps: the headline figures
    distill) run_distill ;;                      # come back even if the lease ends during the sweeps
    all) run_tests; run_layer; run_layer_rows; run_kernels; run_distill ;;
    lease)
        run_layer 135
        run_layer_rows 65
        run_kernels 80 0 default 2048x8 1024x4  # the per-pass default, with the rescale and two-stage A/B rows; two
        # launches more for the two-stage pass's stages (both at one launch: 2048 x 8, stage B's default; 1024 x 4)
        run_tests 210
        left=$((585 - (SECONDS - t_start)))  # a run takes ~105 s, the teacher ~22 s
        if ((left >= 255)); then run_distill "$left" kd_fused tad_fused
        elif ((left >= 150)); then run_distill "$left" tad_fused
        else echo "gpu_check: no time left for tailkd distill"; fi ;;
    *) echo "gpu_check: unknown stage '$stage' (layer, distill, lease or all)"; exit 2 ;;
esac
echo "gpu_check: stage $stage finished with status $status after $((SECONDS - t_start)) s"
exit $status
