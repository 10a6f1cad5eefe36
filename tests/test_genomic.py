"""Genomic encoders on real gene-expression probes (sksurv breast cancer cohort, 198 patients x 76 probes)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from histomim.multimodal.configuration_fusion import HistoFusionConfig
from histomim.multimodal.genomic import PathwayEncoder, SNNEncoder, pathway_assignment
from histomim.multimodal.modeling_fusion import HistoFusionForSurvival


@pytest.fixture(scope="module")
def genes() -> pd.DataFrame:
    """(198, 76) standardized expression of the real probes (age/er/grade/size dropped)."""
    from sksurv.datasets import load_breast_cancer

    features, _ = load_breast_cancer()
    probes = features[[c for c in features.columns if c.startswith("X")]].astype(float)
    return (probes - probes.mean()) / probes.std()


def test_snn_keeps_real_expression_self_normalized(genes):
    torch.manual_seed(0)
    encoder = SNNEncoder(genes.shape[1], hidden_sizes=(256, 256, 256, 256), dropout=0.25).eval()
    first = encoder.blocks[0][0]
    assert first.weight.std().item() == pytest.approx(1 / math.sqrt(genes.shape[1]), rel=0.1)  # LeCun normal

    with torch.no_grad():
        embedding = encoder(torch.tensor(genes.values, dtype=torch.float32))  # (198, 256) after 4 SELU layers
    # the SELU fixed point: standardized inputs stay near zero mean, unit variance through depth
    assert abs(embedding.mean().item()) < 0.25
    assert 0.7 < embedding.std().item() < 1.3


def test_model_init_uses_lecun_normal_for_snn_layers(genes):
    config = HistoFusionConfig(genomic_num_features=genes.shape[1], genomic_hidden_sizes=[128], hidden_size=64)
    model = HistoFusionForSurvival(config)
    weight = model.genomic_encoder.blocks[1][0].weight  # (64, 128), initialized by transformers' post_init
    assert weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.1)


def test_pathway_assignment_from_table_and_mapping(genes):
    probes = list(genes.columns)
    table = pd.DataFrame(
        {"pathway": ["p1", "p1", "p2", "p2", "p2"], "gene": [probes[3], probes[0], probes[10], probes[11], probes[0]]}
    )
    assert pathway_assignment(probes, table) == {"p1": [3, 0], "p2": [10, 11, 0]}
    assert pathway_assignment(probes, {"p1": [probes[5]]}) == {"p1": [5]}


def test_pathway_assignment_names_unknown_genes(genes):
    table = pd.DataFrame({"pathway": ["p1", "p1", "p2"], "gene": [genes.columns[0], "TP53", "BRCA1"]})
    with pytest.raises(ValueError, match=r"p1: \['TP53'\]; p2: \['BRCA1'\]"):
        pathway_assignment(list(genes.columns), table)
    with pytest.raises(ValueError, match=r"\['gene'\]"):
        pathway_assignment(list(genes.columns), table.rename(columns={"gene": "symbol"}))


def test_pathway_tokens_depend_only_on_their_genes(genes):
    torch.manual_seed(0)
    pathways = [[0, 1, 2, 3], [4, 5, 6], [2, 40, 75]]  # overlapping on gene 2
    encoder = PathwayEncoder(pathways, genes.shape[1], hidden_sizes=(32, 16)).eval()
    x = torch.tensor(genes.values[:8], dtype=torch.float32)
    tokens = encoder(x)
    assert tokens.shape == (8, 3, 16)

    perturbed = x.clone()
    perturbed[:, 5] += 3.0  # a gene of pathway 1 only
    changed = (encoder(perturbed) - tokens).abs().amax(dim=(0, 2))  # (P,)
    assert changed[0] == 0 and changed[2] == 0 and changed[1] > 0

    with pytest.raises(ValueError, match=r"pathway 1 must list gene columns in \[0, 76\)"):
        PathwayEncoder([[0], [76]], genes.shape[1])


def test_pathway_model_learns_a_pathway_signal(genes):
    """A genomic-only Cox model with pathway tokens ranks held-out patients by a signal in one pathway."""
    torch.manual_seed(0)
    probes = list(genes.columns)
    gene_sets = {"a": probes[:20], "b": probes[20:40], "c": probes[40:]}
    x = torch.tensor(genes.values, dtype=torch.float32)
    # outcome: exponential times whose log hazard is 2 x the standardized mean of pathway b's first five probes
    signal = x[:, 20:25].mean(dim=1)
    risk = 2 * (signal - signal.mean()) / signal.std()
    time = -torch.log(torch.rand(len(x))) / risk.exp()
    event = torch.rand(len(x)) < 0.8

    config = HistoFusionConfig(
        genomic_num_features=len(probes),
        genomic_pathways=pathway_assignment(probes, gene_sets),
        genomic_hidden_sizes=[16],
        hidden_size=16,
        fusion="coattention",
        dropout=0.0,
        genomic_dropout=0.0,
    )
    model = HistoFusionForSurvival(config)
    train, test = slice(0, 140), slice(140, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(80):
        loss = model(genomic=x[train], time=time[train], event=event[train]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    from sksurv.metrics import concordance_index_censored

    model.eval()
    with torch.no_grad():
        predicted = model(genomic=x[test]).risk.numpy()
    cindex = concordance_index_censored(event[test].numpy(), time[test].numpy(), predicted)[0]
    assert cindex > 0.65, cindex  # the true risk scores ~0.83, a random one 0.5


def test_wrong_genomic_width_names_the_expected_count(genes):
    model = HistoFusionForSurvival(HistoFusionConfig(genomic_num_features=76, hidden_size=16))
    with pytest.raises(ValueError, match=r"genomic must have shape \(B, 76\).*got \(4, 70\)"):
        model(genomic=torch.zeros(4, 70))
    with pytest.raises(ValueError, match="genomic_num_features"):
        HistoFusionConfig(modalities=["genomic"])
    with pytest.raises(ValueError, match=r"genomic_pathways\['p'\] must list gene columns in \[0, 76\)"):
        HistoFusionConfig(genomic_num_features=76, genomic_pathways={"p": [3, 80]})


def test_nan_gene_rows_are_treated_as_missing(genes):
    torch.manual_seed(0)
    config = HistoFusionConfig(genomic_num_features=76, hidden_size=16)
    model = HistoFusionForSurvival(config).eval()
    x = torch.tensor(np.vstack([genes.values[:3], np.full((1, 76), np.nan)]), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"rows \[3\] have none of the modalities"):
        model(genomic=x)
