"""Evaluation on unseen (meta-test) tasks: the two protocols, the compared system prompts, their labels."""

from .config import EvaluationConfig
from .labels import BASELINE_SYSTEM_PROMPTS, check_labels, known_labels, turned_down_label

__all__ = ["BASELINE_SYSTEM_PROMPTS", "EvaluationConfig", "check_labels", "known_labels", "turned_down_label"]
