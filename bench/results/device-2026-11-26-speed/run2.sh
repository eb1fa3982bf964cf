#!/usr/bin/env bash
# issue 10, device call 2: fused kernels, steps with fusion and FA3 variants, FP8 policy, gpu tests.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --root-user-action=ignore .wheels/*.whl 2>&1 | tail -2
mkdir -p /tmp/site && cp -r .device/i10/fa3/ts/* .device/i10/fa3/fwd/* /tmp/site/ && (cd /tmp/site && { xz -d -T4 flash_attn_3/_C.abi3.so.xz & xz -d fa3_fwd/_C.abi3.so.xz; wait; })
export PYTHONPATH=$PWD/.device/i10/src:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee $OUT/gpu.txt
P=".device/i10/bench/speed2_probe.py"
timeout 330 python3 $P --parts kernels,attn,step --profile --variants fp16:sdpa,fp16:fa3:fused,fp16:fa3-fp8:fused,bf16:fa3:fused,fp8:fa3,fp8:fa3:fused,fp8:fa3-fp8:fused --json $OUT/probe2.json > $OUT/probe2.log 2>&1
timeout 150 python3 $P --parts policy,policy-plant --json $OUT/policy.json > $OUT/policy.log 2>&1
(cd .device/i10 && timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_backends.py tests/test_fused_kernels.py 2>&1 | tail -15) > $OUT/gputests.log
grep -v -i "warn" $OUT/probe2.log | grep -v "^    " | tail -40; grep -v -i warn $OUT/policy.log | tail -12; cat $OUT/gputests.log
