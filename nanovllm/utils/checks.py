"""Argument checks shared by LLM()'s options and SamplingParams."""
import numpy as np


def as_bool(name: str, value) -> bool:
    """A bool from bool or numpy's bool_; anything else (1, "yes", None) is refused: a flag takes a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)
