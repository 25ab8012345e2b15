"""OpenAI list prices (USD per million input, output tokens) of the judges the paper and Betley et al. used: the
judge's usage report and a study's cost estimate both read this one table."""

PRICES_PER_MILLION_TOKENS = {
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-2024-08-06": (2.50, 10.00),
}
