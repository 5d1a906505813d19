"""The staged demo: pretraining, every finetune and its evaluation on the synthetic world, a report and a
gallery (``mplug-fast demo``). One concept per module: ``settings`` (demo.yaml), ``stages`` (each stage's
run config and hashes), ``state`` (stage.json, resume), ``runner`` (running the stages), ``gallery`` and
``report``."""

from mplug_fast.demo.runner import run_demo
from mplug_fast.demo.settings import DemoError, load_settings
from mplug_fast.demo.stages import model_signature, stage_config
from mplug_fast.demo.state import STATE_FILE, prepare_stage_dir

__all__ = [
    "STATE_FILE",
    "DemoError",
    "load_settings",
    "model_signature",
    "prepare_stage_dir",
    "run_demo",
    "stage_config",
]
