"""The sensitivity engine: rank layers per expert from a probe file (local metrics) or the model (e2e)."""

from sensq.metrics import METRICS
from sensq.sensitivity.ranking import Ranking, RankRequest, rank_layers

__all__ = ["METRICS", "RankRequest", "Ranking", "rank_layers"]
