"""Packaging for mplug_fast (tool configuration lives in pyproject.toml)."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).resolve().parent / "README.md"

setup(
    name="mplug_fast",
    version="0.1.0",
    description="A fast PyTorch re-implementation of the mPLUG vision-language model (EMNLP 2022)",
    long_description=README.read_text(encoding="utf-8") if README.is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mplug_fast", "mplug_fast.*"]),
    package_data={
        "mplug_fast.data": ["vocab/*"],  # bert-base-uncased vocab.txt + its NOTICE
        "mplug_fast": ["configs/*.yaml", "configs/*/*.yaml"],  # the shipped run configs (--config NAME)
    },
    include_package_data=False,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tokenizers>=0.19",
        "pyyaml",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "transformers>=4.40",  # peer oracle in the tests only
            "pycocoevalcap",
            "pycocotools",
            "matplotlib",
        ],
        "plot": ["matplotlib"],  # loss curves, benchmark plots, demo report images
        "gpu": ["nvidia-ml-py"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["mplug-fast = mplug_fast.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
