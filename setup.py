"""Packaging. The Triton kernels live in the top-level ``kernels/`` folder and ship inside the wheel as
``dlplora_triton.kernels`` (the package_dir mapping below)."""

from setuptools import setup

setup(
    name="dlplora-triton",
    version="0.1.0",
    description="Triton kernels for dynamic, sentence-level fusion of many task LoRAs on one base model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dlplora_triton", "dlplora_triton.kernels"],
    entry_points={"console_scripts": ["dlplora = dlplora_triton.cli:main"]},
    package_dir={"dlplora_triton": "dlplora_triton", "dlplora_triton.kernels": "kernels"},
    package_data={"dlplora_triton": ["data/*.jsonl"]},  # the router's text set, for the demo and tests
    # Ranges, not pins: lent GPU machines carry older builds (torch 2.11 / triton 3.6 seen); the set-up
    # commands in the Makefile pin torch==2.13.0 for the CPU machines.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "safetensors>=0.4",
        "transformers>=4.40",
        "tqdm>=4.60",  # the router's and fine-tuning's progress bars
        "numpy>=1.22",  # the router's vectorized feature hashing
    ],
    extras_require={
        # setuptools >= 70.1 builds wheels without the `wheel` package (the packaging test builds one).
        # matplotlib: the rank plot of `dlplora finetune` is checked by the tests.
        "dev": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.13", "setuptools>=70.1", "matplotlib>=3.5"],
        "bench": ["matplotlib>=3.5"],  # plots of the benchmark results
        "finetune": ["matplotlib>=3.5"],  # dlplora finetune: the rank-per-layer plot
    },
)
