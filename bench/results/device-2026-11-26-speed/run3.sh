#!/usr/bin/env bash
# issue 10, device call 3 (final): zimage-trt bench fp16 and fp8 with the diffusers peers in the same process.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --root-user-action=ignore .wheels/*.whl .device/i10/wheels/*.whl 2>&1 | tail -2
mkdir -p /tmp/site && cp -r .device/i10/fa3/ts/* /tmp/site/ && (cd /tmp/site && xz -d -T8 flash_attn_3/_C.abi3.so.xz)
export PYTHONPATH=$PWD/.device/i10/src:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton, diffusers, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__)" 2>/dev/null | tee -a $OUT/gpu.txt
COMMON="--images 20 --peer-images 6 --batch 4 --extra-resolutions 512x512 --skip-neighbour"
timeout 262 python3 -m zimage_trt.cli bench --precision fp16 --out /tmp/e16 $COMMON --json $OUT/bench-fp16.json > $OUT/bench-fp16.log 2>&1
timeout 318 python3 -m zimage_trt.cli bench --precision fp8 --out /tmp/e8 $COMMON --skip-cold-start --json $OUT/bench-fp8.json > $OUT/bench-fp8.log 2>&1
for f in $OUT/bench-fp16.log $OUT/bench-fp8.log; do echo "== $f"; grep -v -i "warn\|^\s*$\|torchao\|Enum\|float32: \[\]" $f | tail -c 4500; done
