"""PPO / GRPO trainer on Hugging Face models (`fastppo train`)."""

from .config import TrainConfig
from .ppo import PPOTrainer

__all__ = ["PPOTrainer", "TrainConfig"]
