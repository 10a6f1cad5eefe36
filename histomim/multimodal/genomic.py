"""Genomic encoders: a self-normalizing network (SNN) over a gene vector, and pathway tokens.

SNNs (Klambauer et al. 2017) keep activations near zero mean / unit variance through depth with
SELU, AlphaDropout and LeCun-normal weights, which is why PORPOISE and MCAT use them for the
small-n, large-p gene-expression tables of cancer cohorts. Pathway mode groups genes by a gene-set
table and gives every pathway its own small SNN, so that attention fusion can treat each pathway
as one token (MCAT's "genomic signatures").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class SNNLinear(nn.Linear):
    """A linear layer of a self-normalizing network: LeCun-normal weights (``std = 1/sqrt(fan_in)``), zero bias.

    That init is what keeps SELU activations at zero mean / unit variance; a distinct class lets
    the model's weight init recognize these layers.
    """

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.in_features))
        nn.init.zeros_(self.bias)


class SNNBlock(nn.Sequential):
    """``SNNLinear -> SELU -> AlphaDropout``."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        super().__init__(SNNLinear(in_features, out_features), nn.SELU(), nn.AlphaDropout(dropout))


class SNNEncoder(nn.Module):
    """Self-normalizing MLP: gene vector ``(B, G)`` -> embedding ``(B, hidden_sizes[-1])``."""

    def __init__(self, num_features: int, hidden_sizes: Sequence[int] = (256, 256), dropout: float = 0.25):
        super().__init__()
        if num_features < 1 or not hidden_sizes:
            raise ValueError(f"SNNEncoder needs num_features >= 1 and hidden_sizes, got {num_features}, {hidden_sizes}")
        sizes = [num_features, *hidden_sizes]
        self.blocks = nn.Sequential(*(SNNBlock(i, o, dropout) for i, o in itertools.pairwise(sizes)))
        self.num_features = num_features
        self.hidden_size = sizes[-1]

    def forward(self, genes: Tensor) -> Tensor:
        return self.blocks(genes)  # (B, G) -> (B, H)


class PathwayEncoder(nn.Module):
    """One small SNN per pathway: gene vector ``(B, G)`` -> pathway tokens ``(B, P, hidden_sizes[-1])``.

    Args:
        pathways: for each pathway, the column indices of its genes in the gene vector (see
            :func:`pathway_assignment`). Pathways may overlap.
        num_features: width ``G`` of the gene vector, used to check the indices.
    """

    def __init__(
        self,
        pathways: Sequence[Sequence[int]],
        num_features: int,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout: float = 0.25,
    ):
        super().__init__()
        if not pathways:
            raise ValueError("PathwayEncoder needs at least one pathway")
        for number, genes in enumerate(pathways):
            if not genes or min(genes) < 0 or max(genes) >= num_features:
                raise ValueError(f"pathway {number} must list gene columns in [0, {num_features}), got {list(genes)}")
        # All pathways' gene columns in one index: a single gather, then a split per pathway. Persistent,
        # so a loaded model never depends on buffers being rebuilt.
        self.register_buffer("gene_index", torch.as_tensor([g for genes in pathways for g in genes], dtype=torch.long))
        self.pathway_sizes = [len(genes) for genes in pathways]
        self.encoders = nn.ModuleList(SNNEncoder(len(genes), hidden_sizes, dropout) for genes in pathways)
        self.num_pathways = len(pathways)
        self.hidden_size = self.encoders[0].hidden_size

    def forward(self, genes: Tensor) -> Tensor:
        per_pathway = genes.index_select(-1, self.gene_index).split(self.pathway_sizes, dim=-1)  # P x (B, G_p)
        tokens = [encoder(pathway_genes) for encoder, pathway_genes in zip(self.encoders, per_pathway)]  # P x (B, H)
        return torch.stack(tokens, dim=1)  # (B, P, H)


def pathway_assignment(
    feature_names: Sequence[str],
    gene_sets: Mapping[str, Iterable[str]] | "pandas.DataFrame",  # noqa: F821 (pandas is not imported here)
    pathway_column: str = "pathway",
    gene_column: str = "gene",
) -> dict[str, list[int]]:
    """Resolve a gene-set table into column indices of the gene vector.

    Args:
        feature_names: the gene vector's column names, in order (e.g. ``genes_df.columns``).
        gene_sets: ``{pathway: [gene, ...]}``, or a long pandas DataFrame with one row per
            (pathway, gene) pair in ``pathway_column`` and ``gene_column``.

    Returns:
        ``{pathway: [column index, ...]}`` in the table's order, ready for
        ``HistoFusionConfig(genomic_pathways=...)``.

    Raises:
        ValueError: if the table names genes that are not among ``feature_names`` (all of them are
            listed), if a column is missing, or if a pathway is empty.
    """
    if not isinstance(gene_sets, Mapping):
        missing_columns = [c for c in (pathway_column, gene_column) if c not in getattr(gene_sets, "columns", ())]
        if missing_columns:
            raise ValueError(
                f"gene-set table lacks the columns {missing_columns}; pass a {{pathway: genes}} mapping, or a "
                "DataFrame and name its columns with pathway_column= and gene_column="
            )
        grouped: dict[str, list[str]] = {}
        for pathway, gene in zip(gene_sets[pathway_column], gene_sets[gene_column]):
            grouped.setdefault(str(pathway), []).append(str(gene))
        gene_sets = grouped

    position = {name: index for index, name in enumerate(feature_names)}
    assignment: dict[str, list[int]] = {}
    unknown: dict[str, list[str]] = {}
    for pathway, genes in gene_sets.items():
        genes = list(genes)
        if not genes:
            raise ValueError(f"pathway {pathway!r} in the gene-set table has no genes")
        unknown_genes = [gene for gene in genes if gene not in position]
        if unknown_genes:
            unknown[pathway] = unknown_genes
        assignment[pathway] = [position[gene] for gene in genes if gene in position]
    if unknown:
        listing = "; ".join(f"{pathway}: {genes}" for pathway, genes in unknown.items())
        raise ValueError(f"gene-set table names genes that are not among the {len(position)} gene columns: {listing}")
    return assignment


__all__ = ["PathwayEncoder", "SNNBlock", "SNNEncoder", "SNNLinear", "pathway_assignment"]
