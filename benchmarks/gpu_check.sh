#!/usr/bin/env bash
# Everything a borrowed GPU should measure, in one run of about 8 minutes on one H100 (sizes below;
# set the variables to change them). Prepare here with benchmarks/gpu_prepare.sh, then on the GPU
# machine, from the project root, with .gpu carried:
#
#   bash benchmarks/gpu_check.sh            # logs and JSON into $OUT (default bench-results/)
#
# 1. animate end to end on CUDA in float16 with tiny weights: the library call on a template tracked
#    beforehand (no ffmpeg needed), and the command line too where ffmpeg is on the machine;
# 2. every version's full-size networks (random weights in the released layout, written once into
#    $WEIGHTS), float16, 512 px: seconds per frame, peak GPU memory, UNet TFLOP/s and utilisation;
# 3. the speed paths on the app's default video version at 512 px and 96 frames: default, --compile,
#    --channels-last, --low-memory (peak memory and speed);
# 4. ours against the official pipelines (the checkout in .gpu/official) on the same weights.
# Each step has its own time limit; a failed step is reported and the next one runs.
set -uo pipefail
out=${OUT:-bench-results}
python=${PYTHON:-python3}
weights=${WEIGHTS:-/tmp/hellomeme-full-size}
steps=${STEPS:-4}             # full-size denoising steps (the default 25 scale the seconds linearly)
frames=${FRAMES:-24}          # every version's clip length
long=${LONG_FRAMES:-96}       # the speed paths' clip length
official_runs=${OFFICIAL_RUNS:-v2 v5 v5:image}
mkdir -p "$out"
if [ -d .gpu/whl ]; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/hellomeme-site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/hellomeme-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HELLOMEME_HOME=/tmp/hellomeme-tiny

step() {  # step NAME SECONDS COMMAND...: its output into $out/NAME.log, the end of it shown
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started)) s"
    tail -n 20 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step animate_tiny_fp16 240 "$python" - <<'PY'
import subprocess, sys, time
from pathlib import Path
import torch
import hellomeme_cli as hm
from hellomeme_cli.media.video import ffmpeg_exe
from hellomeme_cli.weights.cache import WeightCache
from hellomeme_cli.weights.tiny import make_tiny

make_tiny(WeightCache().home).import_path(Path(".gpu/face_landmarker.task"))
pipe = hm.load_pipeline(device="cuda", dtype="float16")
started = time.perf_counter()
made = pipe(".gpu/majicmix1.jpg", ".gpu/qie.npz", output_type="np", num_inference_steps=4, height=256, width=256)
torch.cuda.synchronize()
frames = made.frames
print(f"library: {frames.shape} {frames.dtype} in {time.perf_counter() - started:.1f} s, finite {bool((frames == frames).all())}, "
      f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
try:
    ffmpeg_exe()
except hm.HellomemeError:
    print("command line: skipped (no ffmpeg on this machine)")
else:
    done = subprocess.run([sys.executable, "-m", "hellomeme_cli", "animate", ".gpu/majicmix1.jpg", ".gpu/qie.npz", "--device", "cuda",
                           "--dtype", "float16", "--size", "256", "--steps", "4", "-o", "/tmp/tiny_fp16.mp4", "--force"])
    print(f"command line: exit {done.returncode}")
PY

step full_size_versions 240 "$python" -m benchmarks.bench --full-size-only --full-size-weights "$weights" \
    --full-size-frames "$frames" --full-size-steps "$steps" --json "$out/full_size_versions.json"

for option in default --compile --channels-last --low-memory; do
    flag=$([ "$option" = default ] || echo "$option")
    step "speed_path_${option#--}" 150 "$python" -m benchmarks.bench --full-size-only --full-size-weights "$weights" --versions v2 \
        --full-size-frames "$long" --full-size-steps "$steps" $flag --json "$out/speed_path_${option#--}.json"
done

if [ -d .gpu/official/hellomeme ]; then
    # shellcheck disable=SC2086  # the runs are words
    step vs_official 240 "$python" -m benchmarks.vs_official --official .gpu/official --weights "$weights" --device cuda \
        --versions $official_runs --frames 13 --steps "$steps" --json "$out/vs_official.json"
else
    echo "== vs_official: skipped (no .gpu/official: benchmarks/gpu_prepare.sh OFFICIAL_CHECKOUT)"
fi
