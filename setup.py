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
    author="mplug_fast developers",
    license="Apache-2.0",  # LICENSE; the bundled BERT vocabulary: mplug_fast/data/vocab/NOTICE.md
    keywords=["mPLUG", "vision-language", "multimodal", "VQA", "image captioning", "pytorch", "triton"],
    project_urls={"Paper": "https://arxiv.org/abs/2205.12005"},
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
    extras_require={  # each names what imports it (tests/test_install.py checks both ways)
        "triton": ["triton>=3.0"],  # the Triton kernels (mplug_fast/ops/triton); CUDA wheels of torch ship it
        "flash": ["flash-attn"],  # the flash_attn attention backend (ops/external.py)
        "xformers": ["xformers"],  # the xformers attention backend (ops/external.py)
        "video": ["decord"],  # reading video files for the zero-shot video tasks (data/video.py)
        "plot": ["matplotlib"],  # loss_curves.png of a run (train/metrics_log.py); skipped without it
        "tensorboard": ["tensorboard"],  # TensorBoard scalars of a run (train/metrics_log.py)
        "java-metrics": ["pycocoevalcap"],  # METEOR, SPICE and the Java PTB tokenizer (metrics/caption.py)
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "import-linter",  # the layers contract in pyproject.toml
            "transformers>=4.40",  # peer oracle in the tests only
            "pycocoevalcap",
            "pycocotools",
            "matplotlib",
            "nvidia-ml-py",  # benchmarks/common.py: a GPU's clocks and driver in the results
        ],
    },
    entry_points={"console_scripts": ["mplug-fast = mplug_fast.cli:main"]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
