"""Reinforcement learning (GRPO through TRL) with the paper's defenses: prompts, rewards, trainer, reward log."""
