"""HistoFusion: a multimodal survival model (genomics, histology, radiology) as a transformers model.

    genomic (B, G) ---------> SNN / pathway SNNs ----\
    histology (B, N, D) ----> ABMIL (or ViT+LoRA) ----+--> fusion (modality mask) --> survival head
    radiology (B, C, ...) --> 2-D / 3-D CNN ---------/       (B, H)                   risk / hazards

Any modality may be missing for any patient: pass ``modality_mask`` (B, M), or let the model infer
it (rows with NaN genomic/radiology values, bags without real tiles are missing).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_fusion import HistoFusionConfig
from .fusion import (
    BilinearFusion,
    CoAttentionFusion,
    ConcatFusion,
    ModalityEmbedding,
    drop_modalities,
)
from .genomic import PathwayEncoder, SNNEncoder, SNNLinear
from .heads import CoxHead, DiscreteTimeHead, LinearRisk, discrete_risk, hazards_to_survival
from .losses import cox_partial_likelihood_loss, discrete_time_nll_loss
from .mil import ABMIL, TileEncoderMIL
from .radiology import RadiologyEncoder


@dataclass
class SurvivalModelOutput(ModelOutput):
    """
    loss: the survival loss (Cox partial likelihood or discrete-time NLL) when labels are given.
    risk: (B,) risk score, higher = worse (log hazard ratio for Cox, ``-sum_k S_k`` for discrete time).
    logits: (B, K) hazard logits of a discrete-time head.
    hazards: (B, K) per-bin hazards ``sigmoid(logits)``.
    survival: (B, K) probability of surviving through each bin.
    fused_embedding: (B, H) the patient embedding the head sees.
    modality_mask: (B, M) bool, the modalities actually used per patient (after modality dropout).
    histology_attention: (B, N) MIL attention over tiles (over the sampled tiles in training).
    """

    loss: Tensor | None = None
    risk: Tensor | None = None
    logits: Tensor | None = None
    hazards: Tensor | None = None
    survival: Tensor | None = None
    fused_embedding: Tensor | None = None
    modality_mask: Tensor | None = None
    histology_attention: Tensor | None = None


class HistoFusionPreTrainedModel(PreTrainedModel):
    config_class = HistoFusionConfig
    base_model_prefix = "histofusion"

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier linears (as in MAE), Kaiming convs, LeCun-normal SNN layers, N(0, 0.02) learned tokens."""
        if isinstance(module, LinearRisk):
            # an untrained linear path adds nothing: the model starts as the plain network
            init.zeros_(module.weight)
        elif isinstance(module, SNNLinear):
            # SELU self-normalization needs LeCun-normal weights, std = 1/sqrt(fan_in)
            init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Bilinear)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, (ConcatFusion, BilinearFusion)):
            init.normal_(module.missing_embedding, std=0.02)
        elif isinstance(module, CoAttentionFusion):
            init.normal_(module.missing_query_tokens, std=0.02)
            init.normal_(module.null_token, std=0.02)


class HistoFusionForSurvival(HistoFusionPreTrainedModel):
    """Encode each configured modality to ``hidden_size``, fuse under a modality mask, predict survival.

    Saved models carry this file and its sibling files, so they load with
    ``AutoModel.from_pretrained(path, trust_remote_code=True)`` where histomim is not installed, except
    end-to-end histology models: the HistoMIM ViT comes from ``histomim.mim``, which must be installed.

    End-to-end histology (``config.histology_encoder`` set): start the ViT from a pretrained encoder
    with ``model.histology_encoder.encoder.load_state_dict(HistoMIMModel.from_pretrained(path).state_dict())``,
    then train it through LoRA with ``histomim.lora.add_lora(model, target_modules=["qkv"],
    trainable_modules=["mil", "genomic_encoder", "fusion", "survival_head"])`` (see :mod:`.mil`).
    """

    def __init__(self, config: HistoFusionConfig):
        super().__init__(config)
        hidden, dropout = config.hidden_size, config.dropout

        if "genomic" in config.modalities:
            sizes = [*config.genomic_hidden_sizes, hidden]
            if config.genomic_pathways:
                pathways = list(config.genomic_pathways.values())
                self.genomic_encoder = PathwayEncoder(pathways, config.genomic_num_features, sizes, config.genomic_dropout)
            else:
                self.genomic_encoder = SNNEncoder(config.genomic_num_features, sizes, config.genomic_dropout)
        if "histology" in config.modalities:
            self.histology_encoder = self._build_histology_encoder(config)
        if "radiology" in config.modalities:
            self.radiology_encoder = RadiologyEncoder(
                config.radiology_spatial_dims, config.radiology_num_channels, config.radiology_channels, hidden, dropout
            )

        num_modalities = len(config.modalities)
        if config.fusion == "concat":
            self.fusion = ConcatFusion(num_modalities, hidden, dropout)
        elif config.fusion == "bilinear":
            self.fusion = BilinearFusion(num_modalities, hidden, config.bilinear_dim, dropout)
        else:
            self.fusion = CoAttentionFusion(
                num_modalities,
                config.modalities.index("genomic"),
                config.num_genomic_tokens,
                hidden,
                config.num_attention_heads,
                dropout,
            )

        if config.head == "cox":
            self.survival_head = CoxHead(hidden, dropout)
        else:
            self.survival_head = DiscreteTimeHead(hidden, config.num_bins, dropout)
        if config.genomic_linear:
            self.genomic_linear = LinearRisk(config.genomic_num_features)
        self.post_init()

    @staticmethod
    def _build_histology_encoder(config: HistoFusionConfig) -> nn.Module:
        """ABMIL over precomputed tile features, or a HistoMIM ViT + ABMIL over tile pixels.

        The tile-pixel path (``config.histology_encoder`` set) needs histomim installed: a saved
        end-to-end model does not load with ``trust_remote_code=True`` alone, only the tile-feature one does.
        """
        def abmil(feature_dim: int) -> ABMIL:
            return ABMIL(
                feature_dim, config.hidden_size, config.histology_attention_dim, config.dropout, config.histology_max_tiles
            )

        if config.histology_encoder is None:
            return abmil(config.histology_feature_dim)
        # Needs histomim installed, unlike the rest of this file; imported by name so that transformers'
        # remote-code import scan does not demand histomim where only the saved files exist.
        mim = importlib.import_module("histomim.mim")
        encoder = mim.HistoMIMModel(config.histology_encoder)
        return TileEncoderMIL(encoder, abmil(encoder.config.pooled_size))

    # ------------------------------------------------------------------------------------ inputs

    def _check_inputs(self, inputs: dict[str, Tensor | None], histology_mask: Tensor | None) -> int:
        """Validate shapes against the config; returns the batch size."""
        config = self.config
        passed = {name: value for name, value in inputs.items() if value is not None}
        absent = [name for name in passed if name not in config.modalities]
        if absent:
            raise ValueError(f"got input for {absent}, but this model's config.modalities is {config.modalities}")
        if not passed:
            raise ValueError(f"no modality passed; this model takes {config.modalities}")
        sizes = {name: value.shape[0] for name, value in passed.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"modalities disagree on the batch size: {sizes}")

        genomic, histology, radiology = inputs["genomic"], inputs["histology"], inputs["radiology"]
        if genomic is not None and (genomic.ndim != 2 or genomic.shape[1] != config.genomic_num_features):
            raise ValueError(
                f"genomic must have shape (B, {config.genomic_num_features}) (config.genomic_num_features), "
                f"got {tuple(genomic.shape)}"
            )
        if histology is not None:
            if config.histology_encoder is None and (histology.ndim != 3 or histology.shape[-1] != config.histology_feature_dim):
                raise ValueError(
                    f"histology tile features must have shape (B, N, {config.histology_feature_dim}) "
                    f"(config.histology_feature_dim), got {tuple(histology.shape)}"
                )
            if config.histology_encoder is not None and histology.ndim != 5:
                raise ValueError(f"histology tile pixels must have shape (B, N, C, H, W), got {tuple(histology.shape)}")
            if histology_mask is not None and histology_mask.shape != histology.shape[:2]:
                raise ValueError(f"histology_mask must have shape {tuple(histology.shape[:2])}, got {tuple(histology_mask.shape)}")
        if radiology is not None and radiology.ndim != config.radiology_spatial_dims + 2:
            raise ValueError(
                f"radiology must have {config.radiology_spatial_dims + 2} dims (config.radiology_spatial_dims="
                f"{config.radiology_spatial_dims}), got shape {tuple(radiology.shape)}"
            )
        return next(iter(sizes.values()))

    def _resolve_modality_mask(
        self, inputs: dict[str, Tensor | None], histology_mask: Tensor | None, modality_mask: Tensor | None, batch: int
    ) -> Tensor:
        """(B, M) bool: which modalities each patient has, given or inferred, checked for consistency."""
        modalities = self.config.modalities
        available = []  # (B,) per modality: the input has usable values for that patient
        for name in modalities:
            value = inputs[name]
            if value is None:
                available.append(torch.zeros(batch, dtype=torch.bool, device=self.device))
            elif name == "histology":
                available.append(histology_mask.any(dim=1))  # a bag without real tiles is missing
            else:
                available.append(value.flatten(1).isfinite().all(dim=1))
        available = torch.stack(available, dim=1)  # (B, M)

        if modality_mask is None:
            modality_mask = available
        else:
            if modality_mask.shape != (batch, len(modalities)):
                raise ValueError(
                    f"modality_mask must have shape ({batch}, {len(modalities)}), columns {modalities}; "
                    f"got {tuple(modality_mask.shape)}"
                )
            modality_mask = modality_mask.bool().to(available.device)
            unusable = modality_mask & ~available  # (B, M) marked present, but nothing usable to encode
            if unusable.any():
                m = int(unusable.any(dim=0).nonzero()[0])
                rows = unusable[:, m].nonzero().flatten().tolist()
                raise ValueError(
                    f"modality_mask marks {modalities[m]!r} present for rows {rows}, but its input is missing, "
                    "non-finite, or (histology) has no real tiles there"
                )
        empty_rows = (~modality_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"rows {empty_rows} have none of the modalities {modalities}; every patient needs at least one")
        return modality_mask

    # ------------------------------------------------------------------------------------ encoders

    def _encode(
        self, name: str, value: Tensor | None, present: Tensor, histology_mask: Tensor | None, batch: int
    ) -> tuple[ModalityEmbedding, Tensor | None]:
        """One modality -> its embedding (and MIL attention for histology). ``present``: (B,) bool."""
        hidden = self.config.hidden_size
        if value is None:
            num_tokens = self.config.num_genomic_tokens if name == "genomic" else 1
            tokens = torch.zeros(batch, num_tokens, hidden, device=self.device, dtype=self.dtype)  # (B, T, H)
            return ModalityEmbedding(tokens[:, 0], tokens, tokens.new_zeros(batch, num_tokens, dtype=torch.bool)), None

        if name == "histology":
            tiles = histology_mask & present[:, None]  # (B, N): patients without histology have no tiles
            mil = self.histology_encoder(value, tiles)
            return ModalityEmbedding(mil.pooled, mil.tokens, mil.token_mask), mil.attention

        # zero the rows of absent patients so NaN placeholders cannot reach the gradients
        value = torch.where(present.view(-1, *[1] * (value.ndim - 1)), value, torch.zeros_like(value))
        if name == "genomic" and self.config.genomic_pathways:
            tokens = self.genomic_encoder(value)  # (B, P, H)
            pooled = tokens.mean(dim=1)  # (B, H)
        else:
            encoder = self.genomic_encoder if name == "genomic" else self.radiology_encoder
            pooled = encoder(value)  # (B, H)
            tokens = pooled.unsqueeze(1)  # (B, 1, H)
        token_mask = present.unsqueeze(1).expand(-1, tokens.shape[1])  # (B, T)
        return ModalityEmbedding(pooled, tokens, token_mask), None

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        genomic: Tensor | None = None,
        histology: Tensor | None = None,
        histology_mask: Tensor | None = None,
        radiology: Tensor | None = None,
        modality_mask: Tensor | None = None,
        time: Tensor | None = None,
        event: Tensor | None = None,
        bin_index: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SurvivalModelOutput | tuple:
        r"""
        genomic: (B, G) gene vector; rows of NaN mark patients without genomics.
        histology: (B, N, D) precomputed tile features, or (B, N, C, H, W) tile pixels when
            `config.histology_encoder` is set.
        histology_mask: (B, N) bool, True for real tiles (padded bags); a bag with no real tile is missing.
        radiology: (B, C, H, W) or (B, C, D, H, W) images; rows of NaN mark patients without a scan.
        modality_mask: (B, M) bool over `config.modalities`, True where the patient has the modality;
            inferred from the inputs when None.
        time, event: (B,) follow-up time and event indicator (True = observed) for the Cox loss.
        bin_index, event: (B,) time bin and event indicator for the discrete-time loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = {"genomic": genomic, "histology": histology, "radiology": radiology}
        batch = self._check_inputs(inputs, histology_mask)
        if histology is not None:
            if histology_mask is None:
                histology_mask = torch.ones(histology.shape[:2], dtype=torch.bool, device=histology.device)  # (B, N)
            histology_mask = histology_mask.bool()
        modality_mask = self._resolve_modality_mask(inputs, histology_mask, modality_mask, batch)  # (B, M)
        if self.training:
            modality_mask = drop_modalities(modality_mask, self.config.modality_dropout)

        embeddings, histology_attention = [], None
        for m, name in enumerate(self.config.modalities):
            embedding, attention = self._encode(name, inputs[name], modality_mask[:, m], histology_mask, batch)
            embeddings.append(embedding)
            histology_attention = attention if attention is not None else histology_attention
        fused = self.fusion(embeddings, modality_mask)  # (B, H)
        linear = self._linear_risk(genomic, modality_mask)  # (B,) or None

        logits = hazards = survival = None
        if self.config.head == "cox":
            risk = self.survival_head(fused)  # (B,)
            risk = risk + linear if linear is not None else risk
        else:
            logits = self.survival_head(fused)  # (B, K)
            logits = logits + linear[:, None] if linear is not None else logits  # shifts every bin's log-odds
            hazards = torch.sigmoid(logits)
            survival = hazards_to_survival(hazards)
            risk = discrete_risk(hazards)  # (B,)
        loss = self._loss(risk, logits, time, event, bin_index)

        output = SurvivalModelOutput(
            loss=loss,
            risk=risk,
            logits=logits,
            hazards=hazards,
            survival=survival,
            fused_embedding=fused,
            modality_mask=modality_mask,
            histology_attention=histology_attention,
        )
        return output if return_dict else output.to_tuple()

    def _linear_risk(self, genomic: Tensor | None, modality_mask: Tensor) -> Tensor | None:
        """``x . beta`` of the linear path (B,), zero for patients whose genomics is missing or dropped."""
        if not self.config.genomic_linear or genomic is None:
            return None
        present = modality_mask[:, self.config.modalities.index("genomic")]  # (B,)
        genomic = torch.where(present[:, None], genomic, torch.zeros_like(genomic))  # NaN rows cannot leak
        return self.genomic_linear(genomic)

    def _loss(
        self, risk: Tensor, logits: Tensor | None, time: Tensor | None, event: Tensor | None, bin_index: Tensor | None
    ) -> Tensor | None:
        if time is None and event is None and bin_index is None:
            return None
        if self.config.head == "cox":
            if time is None or event is None:
                raise ValueError("the Cox loss needs both `time` and `event`")
            return cox_partial_likelihood_loss(risk, time.to(risk.dtype), event.bool(), ties=self.config.cox_ties)
        if bin_index is None or event is None:
            raise ValueError("the discrete-time loss needs both `bin_index` and `event`")
        return discrete_time_nll_loss(logits, bin_index.long(), event.bool(), alpha=self.config.discrete_loss_alpha)


__all__ = ["HistoFusionForSurvival", "HistoFusionPreTrainedModel", "SurvivalModelOutput"]
