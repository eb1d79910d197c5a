"""PPO / GRPO trainer on Hugging Face models."""
