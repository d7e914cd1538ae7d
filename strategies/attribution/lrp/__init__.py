"""Parameter-level Layer-wise Relevance Propagation (arXiv 2605.05285 section 4.1).

See docs/attribution.md for the rules and the readings fixed where the paper is silent.
"""

from strategies.attribution.lrp.architectures import ARCHITECTURES
from strategies.attribution.lrp.engine import (
    Seeds,
    parameter_relevance,
    scoring_scope,
    stream_parameter_relevance,
)

SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Seeds",
    "parameter_relevance",
    "scoring_scope",
    "stream_parameter_relevance",
]
