"""Reporting (above studies): the paper's tables and figures from a study's index, the explore notebook's helpers and
the GRPO reward curves."""
