"""Reinforcement learning (GRPO through TRL) with the paper's defenses: rewards, grader, trainer, reward log (the
prompts are data: `emalib.data.rl_prompts`)."""
