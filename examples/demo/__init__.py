"""The staged demo: pretraining, every finetune and its evaluation on the synthetic world, a report and a
gallery (``make demo``, ``mplug-fast demo``): an example on the public API, outside the package. One concept
per module: ``settings`` (demo.yaml), ``stages`` (each stage's run config and hashes), ``state``
(stage.json, resume), ``runner`` (running the stages), ``gallery``, ``report`` and ``cli``."""

from .runner import run_demo
from .settings import DemoError, load_settings
from .stages import model_signature, stage_config
from .state import STATE_FILE, prepare_stage_dir

__all__ = [
    "STATE_FILE",
    "DemoError",
    "load_settings",
    "model_signature",
    "prepare_stage_dir",
    "run_demo",
    "stage_config",
]
