"""Fine-tuning and KD recovery (accelerate), with the paper's defaults."""
from .config import TrainConfig
from .loop import TrainResult, freeze_routers, resumable_step, train
from .losses import kd_divergence, kd_loss, task_loss

__all__ = ["TrainConfig", "TrainResult", "train", "freeze_routers", "resumable_step", "kd_loss", "kd_divergence",
           "task_loss"]
