from setuptools import find_packages, setup

setup(
    name="zimage_trt",
    version="0.1.0",
    description="TensorRT-compiled inference for Z-Image-Turbo: fixed-shape engines and a lean GPU runtime",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0",  # the tokenizer format saved by tests (TokenizersBackend) is transformers 5
        "safetensors>=0.4",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        "onnxscript>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "pillow>=10",
    ],
    extras_require={
        "rtx": ["tensorrt-rtx-cu13>=1.7,<1.8"],
        "trt": ["tensorrt>=10"],
        "telemetry": ["nvidia-ml-py>=12"],
        # FlashAttention-3 forward kernels for Hopper (fp16, bf16, FP8); model/attention.py finds either.
        "fa3": ["tokenspeed-fa3>=3.0.0.post20260810"],
        # the FP8 peer of `zimage-trt bench --precision fp8 --compare diffusers`
        "bench": ["torchao>=0.18"],
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["zimage-trt=zimage_trt.cli:main"]},
)
