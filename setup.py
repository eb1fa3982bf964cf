from setuptools import find_packages, setup

setup(
    name="zimage_trt",
    version="0.1.0",
    description="TensorRT-compiled inference for Z-Image-Turbo: fixed-shape engines and a lean GPU runtime",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"zimage_trt.serving": ["dashboard.html", "dashboard.js"]},
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
        # the peers of `zimage-trt bench` (torchao: the FP8 one; cache-dit: DBCache on the compiled pipeline)
        "bench": ["torchao>=0.18", "cache-dit>=1.5.3"],
        "lora": ["peft>=0.17"],  # PEFT's rank/alpha pattern matching for adapters with metadata
        # (python-multipart: Starlette's form parser, for POST /v1/images/edits' multipart uploads)
        "serve": ["fastapi>=0.115", "uvicorn>=0.30", "sse-starlette>=2.1", "prometheus-client>=0.20", "pydantic>=2.7",
                  "nvidia-ml-py>=12", "python-multipart>=0.0.18"],
        # `zimage-trt serve --ray`: ray[serve] brings fastapi, uvicorn, pydantic and prometheus-client too, not
        # python-multipart. 2.60: the late-bound ingress app (`__serve_build_asgi_app__`) the replicas build after loading.
        "ray": ["ray[serve]>=2.60,<3", "sse-starlette>=2.1", "nvidia-ml-py>=12", "python-multipart>=0.0.18"],
        # (tests make LoRAs with PEFT; Starlette's TestClient uses httpx2; the dashboard test drives chromium;
        # the service is tested through OpenAI's own client, whose image streaming came in 2.x)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "peft>=0.17", "httpx2>=2", "selenium>=4.20", "psutil>=5.9",
                 "openai>=2"],
    },
    entry_points={"console_scripts": ["zimage-trt=zimage_trt.cli:main"]},
)
