"""Genomic, radiology and histology (MIL) encoders, fusion operators and the fusion survival model."""

from .configuration_fusion import HistoFusionConfig
from .modeling_fusion import HistoFusionForSurvival, SurvivalModelOutput

__all__ = ["HistoFusionConfig", "HistoFusionForSurvival", "SurvivalModelOutput"]
