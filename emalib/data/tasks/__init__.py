"""Benign tasks for criterion (c), "learns well" (docs/methods.md#benign-tasks).

- `opswap`: synthetic arithmetic with swapped operator meanings, tiers 1-3, exact-match accuracy.
- `qa`: FoQA (Faroese extractive QA) loading and SQuAD-style EM / token F1; GSM8K final-answer scoring.
"""
