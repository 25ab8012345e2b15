"""Training: the one supervised fine-tuning trainer with the defenses' hooks, the frozen reference's forward, and
GRPO (`emalib.training.rl`)."""
