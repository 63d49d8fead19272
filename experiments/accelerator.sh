#!/usr/bin/env bash
# Every accelerator figure of the performance issue, in one run, on a machine with JAX but without
# TensorFlow or a network (such as the GPU machine lent to some sessions). Prepare here, run there:
#
#   python -m mnist_jax export --out .carry/mnist.npz          # here (tfds); 11 MiB
#   pip install --target .carry/site tqdm                       # here, if that machine lacks tqdm (the H200 had it)
#   bash experiments/accelerator.sh .carry/mnist.npz OUT_DIR    # there, from the repository root, carrying .carry
#   bash experiments/accelerator.sh .carry/mnist.npz OUT_DIR improved   # a second command: the improved recipe
#
# It prints the device, then runs, each part under its own time limit (a part that fails or times
# out is reported and the others still run): the seed recipe (batch 32, 5 epochs) through `fit` in
# float32 (2 runs: the second compiles from the persistent cache); the speedrun recipe over 5 seeds
# (time to 99 % and 99.25 %; bfloat16 on accelerators); the seed recipe's step in each variant the library can run
# (experiments/step_time.py: float32/bfloat16, each convolution form, scan unrolling, one step per
# call), with a profiler trace of 100 steps; the seed recipe in bfloat16; the speedrun in float32.
# Logs and JSON go to OUT_DIR (default results/accelerator). With `improved` as the third argument it runs
# instead the improved recipe at full width (5 vmapped seeds, width 32, Dense 256, 30 epochs; the CPU default is width 16 x 40), one command.
set -u
arrays=${1:?usage: bash experiments/accelerator.sh MNIST.npz [OUT_DIR] [improved]}
out=${2:-results/accelerator}
which=${3:-core}
py=${PYTHON:-$(command -v python || command -v python3)}
repo=$(cd "$(dirname "$0")/.." && pwd)
# mnist_jax from this checkout (it need not be installed there), and carried packages when present.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$repo/.carry/site" ] && export PYTHONPATH="$PYTHONPATH:$repo/.carry/site"
mkdir -p "$out"
export MNIST_JAX_COMPILATION_CACHE="$out/xla-cache"

part() {  # part NAME SECONDS COMMAND...: run it with a limit, keep its log, show its tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

if [ "$which" = improved ]; then
    part device 30 sh -c "nvidia-smi --query-gpu=name,memory.total --format=csv"
    part improved 540 "$py" experiments/improved.py --arrays "$arrays" --seeds 5 --width 32 --dense-features 256 --epochs 30 --out "$out/improved"
    exit 0
fi
# In order of importance; the limits add up to 550 s (on the H200 the parts took 5, 36, 61, >150, 35 and 57 s), under the device tool's 600 s per command.
part device 30 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; $py -c \"import jax, mnist_jax; print('jax', jax.__version__, jax.devices())\""
part bench-float32 90 "$py" -m mnist_jax.bench --jax-only --arrays "$arrays" --out "$out/bench-float32.json"
part speedrun 90 "$py" experiments/speedrun.py --arrays "$arrays" --out "$out/speedrun"
part step-time 190 "$py" experiments/step_time.py --arrays "$arrays" --repeats 2 --trace-steps 100 --out "$out/step_time"
part bench-bfloat16 70 "$py" -m mnist_jax.bench --jax-only --arrays "$arrays" --dtype bfloat16 --out "$out/bench-bfloat16.json"
part speedrun-float32 80 "$py" experiments/speedrun.py --arrays "$arrays" --dtype float32 --out "$out/speedrun-float32"
