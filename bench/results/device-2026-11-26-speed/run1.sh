#!/usr/bin/env bash
# issue 10, device call 1: attention kernels, compiled steps per backend/precision, step profiles.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --root-user-action=ignore .wheels/*.whl 2>&1 | tail -2
mkdir -p /tmp/site && cp -r .device/i10/fa3/ts/* .device/i10/fa3/fwd/* /tmp/site/ && (cd /tmp/site && xz -d -T4 flash_attn_3/_C.abi3.so.xz & xz -d fa3_fwd/_C.abi3.so.xz; wait)
export PYTHONPATH=$PWD/.device/i10/src:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)" | tee -a $OUT/gpu.txt
timeout 540 python3 .device/i10/bench/speed2_probe.py --parts attn,step --profile --json $OUT/probe.json > $OUT/probe.log 2>&1
grep -v -i "warn" $OUT/probe.log | tail -c 11000
