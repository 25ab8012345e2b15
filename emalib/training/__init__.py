"""Fine-tuning: chat tokenisation with assistant-only labels, the one trainer, and the loss maths."""
