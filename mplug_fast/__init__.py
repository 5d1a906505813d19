"""mplug_fast: a fast, faithful PyTorch implementation of mPLUG (Li et al., EMNLP 2022).

model = mplug_fast.build_model(mplug_fast.get_config("base"), "vqa")
model = mplug_fast.load_official_checkpoint("mplug_base.pth", "vqa", image_res=384)
pipe = mplug_fast.pipeline("vqa", "runs/vqa")   # a run folder, save_pretrained folder or official .pth
"""

from mplug_fast import modeling
from mplug_fast.config import MPlugConfig, get_config
from mplug_fast.modeling import *  # noqa: F403 (the model classes, listed once: in modeling.__all__)
from mplug_fast.pipeline import Pipeline, pipeline
from mplug_fast.tasks import TASKS, build_model, from_pretrained, get_task, load_official_checkpoint

__version__ = "0.1.0"

__all__ = [
    *modeling.__all__,
    "TASKS",
    "MPlugConfig",
    "Pipeline",
    "__version__",
    "build_model",
    "from_pretrained",
    "get_config",
    "get_task",
    "load_official_checkpoint",
    "pipeline",
]
