"""Evaluation: sampling answers, the LLM judge, metrics and intervals, judge-free signals, the benign-task scoring,
judge agreement, and persona extraction and projection (the persona vector's generate-and-judge pipeline)."""
