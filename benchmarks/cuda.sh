#!/usr/bin/env bash
# The CUDA figures in one go, on a machine with an NVIDIA GPU: the built-in `gpu-small` run (hook and metric cost,
# rollback), the same run under torchrun with a rank per GPU (NCCL for the model, the gloo side channel) and the
# Hugging Face and Lightning callbacks, after the tests that need a GPU. Prints figures; asserts nothing. Run from
# the repository root: `bash benchmarks/cuda.sh` (about 3 minutes on one H200); PYTHON names the interpreter
# (default python3).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'lightning', lightning.__version__)"
echo "== the CUDA tests"
"$python" -m pytest -q -p no:cacheprovider tests/trainer/test_cuda.py 2>&1
figures() {
    echo "== python -m $*"
    timeout 300 "$python" -m "$@" 2>&1
    echo "== exit status $?"
}
figures benchmarks.trainer_overhead --preset gpu-small --device cuda --steps 150
figures benchmarks.distributed_overhead --preset gpu-small --device cuda --nproc-per-node "$gpus" --steps 100
figures benchmarks.trainer_commands --preset gpu-small --device cuda --commands 100
figures benchmarks.trainer_rollback --preset gpu-small --device cuda --repeats 10
figures benchmarks.hf_lightning_overhead --device cuda --rounds 2 --steps 60 --latency-steps 200
figures benchmarks.health_readback
