"""The staged demo: pretraining, every finetune and its evaluation on the synthetic world, a report and a
gallery (``mplug-fast demo``). One concept per module: ``settings`` (demo.yaml), ``stages`` (each stage's
run config and hashes), ``state`` (stage.json, resume), ``runner`` (running the stages), ``gallery`` and
``report``."""

from .runner import run_demo, run_stage
from .settings import DemoError, DemoInterrupted, DemoSettings, load_settings
from .stages import check_same_model, eval_settings, model_signature, stage_config, train_hash
from .state import STATE_FILE, fresh, prepare_stage_dir, read_state, stage_done

__all__ = [
    "STATE_FILE",
    "DemoError",
    "DemoInterrupted",
    "DemoSettings",
    "check_same_model",
    "eval_settings",
    "fresh",
    "load_settings",
    "model_signature",
    "prepare_stage_dir",
    "read_state",
    "run_demo",
    "run_stage",
    "stage_config",
    "stage_done",
    "train_hash",
]
