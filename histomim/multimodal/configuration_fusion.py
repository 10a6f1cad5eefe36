"""HistoFusion configuration: which modalities a survival model sees, how each is encoded and fused."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

MODALITIES = ("genomic", "histology", "radiology")
FUSIONS = ("concat", "bilinear", "coattention")
HEADS = ("cox", "discrete")
COX_TIES = ("breslow", "efron")

# Where the saved files live, so a saved model loads with trust_remote_code=True without histomim installed.
AUTO_MAP = {
    "AutoConfig": "configuration_fusion.HistoFusionConfig",
    "AutoModel": "modeling_fusion.HistoFusionForSurvival",
}


class TileEncoderSpec(SubConfigSpec):
    """The optional tile-encoder sub-config: resolved through ``AutoConfig`` by its ``model_type`` when set.

    It has no default to diff a saved config against (there is no default tile encoder), so
    serializing never resolves ``model_type="histomim"``: a tile-feature model's config saves and loads
    with remote code where histomim is not installed.
    """

    def default_config_fields(self) -> dict[str, Any]:
        return {}


def _as_size(value: int | Sequence[int], spatial_dims: int) -> list[int]:
    return [int(value)] * spatial_dims if isinstance(value, int) else [int(v) for v in value]


class HistoFusionConfig(PretrainedConfig):
    r"""Configuration of a :class:`~histomim.multimodal.modeling_fusion.HistoFusionForSurvival`.

    Every modality is encoded to a `hidden_size` embedding, the embeddings are fused, and a survival
    head maps the fused embedding to a risk score (Cox) or per-bin hazards (discrete time).

    General: `modalities` (a subset of `"genomic"`, `"histology"`, `"radiology"`; its order is the
    column order of `modality_mask`), `hidden_size`, `fusion` (`"concat"`, `"bilinear"` gated
    Kronecker fusion with `bilinear_dim` per modality, or `"coattention"` where genomic tokens
    attend over the other modalities' tokens with `num_attention_heads` heads), `head` (`"cox"` or
    `"discrete"` with `num_bins`), `modality_dropout` (probability of hiding a present modality
    during training), `dropout`, and the loss settings `cox_ties` and `discrete_loss_alpha`.

    Genomic: `genomic_num_features` (width of the gene vector), `genomic_hidden_sizes` (SNN widths
    before the final `hidden_size` layer), `genomic_dropout` (AlphaDropout), optional
    `genomic_feature_names`, and `genomic_pathways` (`{pathway: [gene column, ...]}`, see
    :func:`~histomim.multimodal.genomic.pathway_assignment`): when set, the genes become one token
    per pathway, each from its own small SNN. `genomic_linear`: add a linear log-hazard term on the raw
    genomic vector to the head's output (Cox: to the risk; discrete: to every bin's hazard logit), so a
    linear Cox model lives inside the network (:class:`~histomim.multimodal.heads.LinearRisk`).

    Histology: `histology_feature_dim` (width of precomputed tile features), `histology_attention_dim`
    (gated-attention MIL width), `histology_max_tiles` (random tile sampling while training). Or
    end to end from tile pixels: `histology_encoder`, a HistoMIM encoder config (dict or
    `HistoMIMConfig`), whose pooled output width becomes the tile feature width. It is a transformers
    sub-config (`sub_configs`): stored as a nested `HistoMIMConfig` object, saved nested in config.json,
    and resolved by its `model_type` through `AutoConfig` (so it needs histomim imported, as the
    end-to-end model does).

    Radiology: `radiology_spatial_dims` (2 for slices, 3 for volumes), `radiology_num_channels`,
    `radiology_image_size` (the size images are resampled to, see
    :func:`~histomim.data.radiology.load_scan`) and `radiology_channels` (CNN stage widths).
    """

    model_type = "histofusion"
    # the tile encoder's config is optional (tile-feature models have none); AutoConfig resolves its model_type
    sub_configs_defaults = {
        "histology_encoder": TileEncoderSpec(config_class=AutoConfig, model_type="histomim", optional=True)
    }

    def __init__(
        self,
        modalities: Sequence[str] = ("genomic",),
        hidden_size: int = 128,
        fusion: str = "concat",
        head: str = "cox",
        num_bins: int = 4,
        modality_dropout: float = 0.0,
        dropout: float = 0.1,
        bilinear_dim: int = 16,
        num_attention_heads: int = 4,
        cox_ties: str = "efron",
        discrete_loss_alpha: float = 0.0,
        genomic_num_features: int | None = None,
        genomic_hidden_sizes: Sequence[int] = (256,),
        genomic_dropout: float = 0.25,
        genomic_feature_names: Sequence[str] | None = None,
        genomic_pathways: Mapping[str, Sequence[int]] | None = None,
        genomic_linear: bool = False,
        histology_feature_dim: int | None = None,
        histology_attention_dim: int = 128,
        histology_max_tiles: int | None = None,
        histology_encoder: Mapping[str, Any] | PretrainedConfig | None = None,
        radiology_spatial_dims: int = 2,
        radiology_num_channels: int = 1,
        radiology_image_size: int | Sequence[int] = 64,
        radiology_channels: Sequence[int] = (16, 32, 64),
        **kwargs,
    ):
        self.modalities = list(modalities)
        self.hidden_size = hidden_size
        self.fusion = fusion
        self.head = head
        self.num_bins = num_bins
        self.modality_dropout = modality_dropout
        self.dropout = dropout
        self.bilinear_dim = bilinear_dim
        self.num_attention_heads = num_attention_heads
        self.cox_ties = cox_ties
        self.discrete_loss_alpha = discrete_loss_alpha
        self.genomic_num_features = genomic_num_features
        self.genomic_hidden_sizes = list(genomic_hidden_sizes)
        self.genomic_dropout = genomic_dropout
        self.genomic_feature_names = list(genomic_feature_names) if genomic_feature_names is not None else None
        self.genomic_linear = bool(genomic_linear)
        self.genomic_pathways = {str(k): [int(i) for i in v] for k, v in genomic_pathways.items()} if genomic_pathways else None
        # a dict (config.json) becomes a config object in PretrainedConfig's __post_init__ (sub_configs_defaults)
        self.histology_encoder = dict(histology_encoder) if isinstance(histology_encoder, Mapping) else histology_encoder
        self.histology_feature_dim = histology_feature_dim
        self.histology_attention_dim = histology_attention_dim
        self.histology_max_tiles = histology_max_tiles
        self.radiology_spatial_dims = radiology_spatial_dims
        self.radiology_num_channels = radiology_num_channels
        self.radiology_image_size = _as_size(radiology_image_size, radiology_spatial_dims)
        self.radiology_channels = list(radiology_channels)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Reject settings that would only fail later, deep inside model construction or a forward pass."""
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {self.modalities}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion == "bilinear" and len(self.modalities) < 2:
            raise ValueError(f"fusion='bilinear' needs at least two modalities, got {self.modalities}")
        if self.fusion == "coattention" and "genomic" not in self.modalities:
            raise ValueError(f"fusion='coattention' uses genomic tokens as queries; modalities {self.modalities} lack 'genomic'")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "discrete" and self.num_bins < 2:
            raise ValueError(f"head='discrete' needs num_bins >= 2, got {self.num_bins}")
        if self.cox_ties not in COX_TIES:
            raise ValueError(f"cox_ties must be one of {COX_TIES}, got {self.cox_ties!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must lie in [0, 1), got {self.modality_dropout}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )

        if "genomic" in self.modalities:
            if not self.genomic_num_features or self.genomic_num_features < 1:
                raise ValueError("modality 'genomic' needs genomic_num_features (the width of the gene vector)")
            names = self.genomic_feature_names
            if names is not None and len(names) != self.genomic_num_features:
                raise ValueError(
                    f"genomic_feature_names has {len(names)} names but genomic_num_features is {self.genomic_num_features}"
                )
            for pathway, genes in (self.genomic_pathways or {}).items():
                if not genes or min(genes) < 0 or max(genes) >= self.genomic_num_features:
                    raise ValueError(
                        f"genomic_pathways[{pathway!r}] must list gene columns in [0, {self.genomic_num_features}), got {genes}"
                    )
        if self.genomic_linear and "genomic" not in self.modalities:
            raise ValueError(f"genomic_linear needs the 'genomic' modality, got modalities {self.modalities}")
        has_tile_width = bool(self.histology_feature_dim) and self.histology_feature_dim >= 1
        if "histology" in self.modalities and self.histology_encoder is None and not has_tile_width:
            raise ValueError("modality 'histology' needs histology_feature_dim (tile feature width) or histology_encoder")
        if "radiology" in self.modalities:
            if self.radiology_spatial_dims not in (2, 3):
                raise ValueError(f"radiology_spatial_dims must be 2 or 3, got {self.radiology_spatial_dims}")
            if len(self.radiology_image_size) != self.radiology_spatial_dims:
                raise ValueError(
                    f"radiology_image_size {self.radiology_image_size} needs {self.radiology_spatial_dims} sizes "
                    f"(radiology_spatial_dims={self.radiology_spatial_dims})"
                )

    @property
    def num_genomic_tokens(self) -> int:
        """Genomic tokens seen by co-attention: one per pathway, or one for the whole gene vector."""
        return len(self.genomic_pathways) if self.genomic_pathways else 1


__all__ = ["HistoFusionConfig"]
