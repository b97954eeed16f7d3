#!/usr/bin/env bash
# The one prepared check a session with a GPU runs: the GPU tests, the meta-gradients' numerical error
# (benchmarks/numerics.py: against float64, with the default TF32 state, --tf32 false and --amp), bench.py's
# rows on CUDA in float32 and with --amp --channels-last (FLOPs and TFLOP/s included), the aggregate of 1, 2 and 4 copies
# of one small row at once, benchmarks/loader.py on CUDA, the projection of the full paper runs, and, if
# time is left, the rows in strict float32 (--tf32 false). Everything lands in $OUT as at most 8 files:
#
#   summary.json         the machine, torch, GPU, each part's exit code and seconds, and under 'numerics'
#                        benchmarks/numerics.py --device cuda (the relative errors of G and of MAXL's gradients)
#   gpu_check.log        every part's output
#   bench-float32.json   bench.py --device cuda                       (PyTorch's default: TF32 convolutions)
#   bench-fast.json      bench.py --device cuda --amp --channels-last
#   concurrent.json      bench.py --device cuda --only single --concurrent 1,2,4
#   loader.json          benchmarks/loader.py --device cuda
#   projection.json      benchmarks/project.py over the bench files
#   bench-strict.json    bench.py --device cuda --tf32 false          (only if time is left)
#
# Needs only what the GPU machine's image has (python3 with torch, torchvision, pytest; no network). Each
# part runs under its own time limit, cut further to what is left of GPU_CHECK_BUDGET seconds (default 480),
# so one hang cannot eat the device time; a part with no time left is skipped and says so.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#   OUT=/tmp/dry GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#       (the CPU dry run: a cheap row or two, one step each, the CPU-possible tests)
set -u
cd "$(dirname "$0")/.." || exit 2
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
BUDGET=${GPU_CHECK_BUDGET:-480}
DATA=${GPU_CHECK_DATA:-dataset}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.json
START=$(date +%s)
: >"$LOG"

if [ "$TINY" = 1 ]; then
    ROWS=sla_baseline
    BENCH=(--warmup 0 --steps 1 --row-timeout 120)
    CONCURRENT=(--only sla_baseline --concurrent 1,2 --warmup 0 --steps 1 --row-timeout 120)
    LOADER=(--batch 4 --size 64 --workers 0 --images 8 --batches 2 --steps 1)
    TESTS=(tests/test_speed_tools.py -k 'flop_count_of_a_conv or aggregate or project or cuda')
    NUMERICS=(--only semi_G_convlarge,maxl_first_order --batch 4 --width 0.0625)
else
    # every method's row, its bare reference and its evaluation batch (human and maxl_meta2_dbl left out)
    ROWS=bare_vgg,single,bare_vgg_mt,maxl_train,maxl_meta2,maxl_meta1,eval_maxl,bare_resnet32,sla_baseline
    ROWS=$ROWS,bare_resnet32_x4,sla_rotation,eval_sla,bare_convlarge,semi_baseline_mixup,semi_meta_mixup,eval_semi
    BENCH=(--warmup 5 --steps 20 --row-timeout 90)
    CONCURRENT=(--only single --concurrent 1,2,4 --warmup 5 --steps 200 --row-timeout 100)
    LOADER=(--batch 64 --workers 0,4,8,15)
    NUMERICS=()               # ConvLarge at batch 128, ResNet-18 at 224 px and batch 64, MAXL's VGG-16s at batch 100
    # the tests that need CUDA (they skip without it; the CPU ones run in the normal suite) and the fast
    # paths (--amp --channels-last) of a real script, which runs on CUDA where there is one
    TESTS=(tests/test_speed_tools.py tests/test_imagenet.py::test_gpu_and_cpu_augmentation_give_the_same_crop
           tests/test_fast_paths.py::test_a_script_runs_with_the_fast_paths -k 'cuda or gpu or fast_paths')
fi

summary() {   # summary NAME RC SECONDS [NOTE]: one part's outcome into summary.json
    "$PY" - "$SUMMARY" "$@" <<'EOF'
import json, os, sys
path, name, rc, seconds = sys.argv[1:5]
info = json.load(open(path)) if os.path.exists(path) else {'parts': []}
info['parts'].append(dict(part=name, rc=int(rc), seconds=int(seconds), note=' '.join(sys.argv[5:])))
json.dump(info, open(path, 'w'), indent=1)
EOF
}

part() {      # part NAME LIMIT COMMAND...: run it under min(LIMIT, time left), its output to the log
    local name=$1 limit=$2 left t rc
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        summary "$name" -1 0 "skipped: no time left"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s, at $(( $(date +%s) - START ))s): $*" | tee -a "$LOG"
    t=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t ))s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$LOG"
    summary "$name" "$rc" $(( $(date +%s) - t )) "$([ $rc = 124 ] && echo timed out)"
}

# the machine
"$PY" - "$SUMMARY" "$DEVICE" "$TINY" <<'EOF' >>"$LOG" 2>&1
import json, os, platform, subprocess, sys, time
import torch
path, device, tiny = sys.argv[1:4]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
try:
    smi = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    smi = f'nvidia-smi: {e}'
info = dict(date=time.strftime('%Y-%m-%d %H:%M:%S'), device=device, tiny=tiny == '1', torch=torch.__version__,
            cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            gpu=gpu, nvidia_smi=smi, python=platform.python_version(), cpus=os.cpu_count(), parts=[])
print(json.dumps(info, indent=1))
json.dump(info, open(path, 'w'), indent=1)
EOF
if [ "$DEVICE" != cpu ] && ! grep -q '"gpu": "' "$SUMMARY"; then
    echo "no CUDA GPU visible to $PY: stopping (see $LOG)" | tee -a "$LOG"
    exit 1
fi

part data 120 "$PY" create_dataset.py --synthetic cifar100 cifar10 --data_root "$DATA"
part tests 120 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider -rs "${TESTS[@]}"
part numerics 100 "$PY" benchmarks/numerics.py --device "$DEVICE" "${NUMERICS[@]}" --json "$OUT/numerics.tmp"
if [ -f "$OUT/numerics.tmp" ]; then      # into summary.json: $OUT holds at most 8 files
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); s['numerics']=json.load(open(sys.argv[2])); json.dump(s, open(sys.argv[1], 'w'), indent=1)" "$SUMMARY" "$OUT/numerics.tmp"
    rm -f "$OUT/numerics.tmp"
fi
part bench-float32 180 "$PY" benchmarks/bench.py --device "$DEVICE" --only "$ROWS" "${BENCH[@]}" \
    --data-root "$DATA" --json "$OUT/bench-float32.json"
part bench-fast 180 "$PY" benchmarks/bench.py --device "$DEVICE" --amp --channels-last --only "$ROWS" "${BENCH[@]}" \
    --data-root "$DATA" --json "$OUT/bench-fast.json"
projection() {
    local files=()
    for f in bench-float32 bench-fast bench-strict; do [ -f "$OUT/$f.json" ] && files+=("$OUT/$f.json"); done
    if [ ${#files[@]} = 0 ]; then echo "=== project: no bench file" | tee -a "$LOG"; return; fi
    part project 40 "$PY" benchmarks/project.py "${files[@]}" --json "$OUT/projection.json"
}
projection
part concurrent 120 "$PY" benchmarks/bench.py --device "$DEVICE" "${CONCURRENT[@]}" --data-root "$DATA" \
    --json "$OUT/concurrent.json"
part loader 100 "$PY" benchmarks/loader.py --device "$DEVICE" "${LOADER[@]}" --json "$OUT/loader.json"
part bench-strict 170 "$PY" benchmarks/bench.py --device "$DEVICE" --tf32 false --only "$ROWS" "${BENCH[@]}" \
    --data-root "$DATA" --json "$OUT/bench-strict.json"
[ -f "$OUT/bench-strict.json" ] && projection

echo "=== done after $(( $(date +%s) - START ))s; files in $OUT:" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
# the tables, for the reply's tail
for f in bench-float32 bench-fast bench-strict concurrent projection; do
    [ -f "$OUT/$f.json" ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1]); print(d.get('table', ''))" "$OUT/$f.json"
done
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); [print(p) for p in d['parts']]" "$SUMMARY"
exit 0
