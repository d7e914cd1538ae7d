"""Naive sequential fine-tuning: train on each task in turn, no protection against forgetting.

The lower bound every continual-learning method is measured against (TRACE's "SeqFT").
"""

from clbench.strategy import CLStrategy


class SeqFT(CLStrategy):
    """Every hook is the base class's no-op: the model just keeps training."""
