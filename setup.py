"""Packaging for mplug_fast (tool configuration lives in pyproject.toml)."""

import hashlib
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch_dir() -> Path | None:
    """The installed torch package folder: importable here, or in the environment being installed into
    (pip's isolated build env hides it from sys.path; its files are read, torch is not imported)."""
    for base in sys.path + [sysconfig.get_paths()["purelib"]]:
        candidate = Path(base or ".") / "torch"
        if (candidate / "share" / "cmake" / "Torch").is_dir():
            return candidate.resolve()
    return None


def _tool(name: str) -> str | None:
    """`name` beside this interpreter (a venv's cmake / ninja from PyPI, unactivated) or on PATH."""
    return shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )


def _cuda_root(nvcc: str) -> Path:
    """The toolkit folder of `nvcc` (which may be a wrapper script): what nvcc reports as its _HERE_."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return Path(line.split("=", 1)[1].strip()).resolve().parent
    return Path(nvcc).resolve().parent.parent


class CMakeBuild(build_ext):
    """Builds `mplug_fast._C` with CMake (CMakeLists.txt) against the installed torch, ninja when present.

    MPLUG_FAST_SKIP_EXT=1: no native build (pure Python). Without torch or cmake the build is skipped with a
    message (the package then runs the Python twins); a failing compile stops the install.
    CUDA: when that torch has CUDA and nvcc is found, for MPLUG_FAST_CUDA_ARCHS (default "8.0;9.0").
    """

    def run(self) -> None:
        if os.environ.get("MPLUG_FAST_SKIP_EXT") == "1":
            print("mplug_fast: MPLUG_FAST_SKIP_EXT=1, installing without the native ops (pure Python)")
            return
        if _torch_dir() is None or _tool("cmake") is None:
            print(
                "mplug_fast: WARNING: no installed torch or no cmake on PATH; installing without the native "
                "ops (pure Python). Install torch and cmake, then build with pip's --no-build-isolation."
            )
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        torch_dir = _torch_dir()
        cuda = runpy.run_path(str(torch_dir / "version.py")).get("cuda")
        nvcc = shutil.which("nvcc") or (
            os.environ.get("CUDA_HOME") and shutil.which("nvcc", path=os.environ["CUDA_HOME"] + "/bin")
        )
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        # One CMake build folder per torch install and cmake: a cache configured for another is never reused.
        tag = hashlib.sha1(f"{torch_dir} {cuda} {_tool('cmake')}".encode()).hexdigest()[:10]
        build_dir = Path(self.build_temp).resolve() / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch_dir / 'share' / 'cmake'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMPLUG_FAST_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DMPLUG_FAST_OUTPUT_DIR={out.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if _tool("ninja"):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"]
        env = dict(os.environ)
        if cuda and nvcc:
            archs = os.environ.get("MPLUG_FAST_CUDA_ARCHS", "8.0;9.0")
            env["TORCH_CUDA_ARCH_LIST"] = archs
            cuda_root = _cuda_root(nvcc)
            nvcc = str(cuda_root / "bin" / "nvcc")
            env["CUDACXX"] = nvcc
            args += [
                "-DMPLUG_FAST_CUDA=ON",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs.replace('.', '')}",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}",
            ]
            # The nvidia-* wheels beside a CUDA torch carry libnvrtc and headers (cusparse.h) that a bare
            # toolkit may lack.
            cuda_flags = os.environ.get("MPLUG_FAST_NVCC_FLAGS", "").split()  # e.g. -Xptxas=-v
            for nvrtc in sorted(torch_dir.parent.glob("nvidia/*/lib/libnvrtc.so*"))[:1]:
                include = nvrtc.parent.parent / "include"
                args += [f"-DCUDA_nvrtc_LIBRARY={nvrtc}", f"-DCMAKE_CXX_FLAGS=-I{include}"]
                cuda_flags.append(f"-I{include}")
            args.append(f"-DCMAKE_CUDA_FLAGS={' '.join(cuda_flags)}")
        print(f"mplug_fast: building _C ({'CUDA ' + archs if cuda and nvcc else 'CPU'}) in {build_dir}")
        start = time.perf_counter()
        subprocess.run([_tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([_tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True, env=env)
        print(f"mplug_fast: built {out.name} in {time.perf_counter() - start:.1f} s")


README = ROOT / "README.md"

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
            "pytest-xdist",  # make test: two workers
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
    ext_modules=[Extension("mplug_fast._C", sources=[])],  # built by CMakeBuild from kernels/
    cmdclass={"build_ext": CMakeBuild},
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
