"""``SurvivalEstimator``: a scikit-learn / scikit-survival estimator around :class:`HistoFusionForSurvival`.

By default the columns of ``X`` form one tabular ("genomic") modality: numeric columns are
median-imputed and standardized, categorical ones one-hot encoded. The model is never worse than a
linear one by construction: an elastic-net Cox fit on those covariates (Coxnet, alpha by inner CV)
becomes a frozen linear path inside the fusion model, and internal cross-validation decides whether
a small self-normalizing network (SNN) with a Cox or discrete-time head, trained full-batch with
AdamW, is added on top of it, replaces it, or is left out (``linear="auto"``). Columns named by
``histology_col`` (tile-feature files) and ``radiology_col`` (DICOM/NIfTI scans) add the other
modalities of the fusion model. With ``histology_encoder`` (a pretrained histomim ViT) the histology column
holds slides or tile folders instead, and the ViT is fine-tuned end to end inside the fusion model through
LoRA adapters (PEFT), which are merged into the saved model and also saved on their own. It plugs into sksurv metrics and sklearn's ``cross_val_score`` /
``GridSearchCV``: ``fit(X, y)`` takes an sksurv structured array, ``predict`` returns risk scores
(higher = worse), ``predict_survival_function`` returns ``StepFunction``s and ``score`` Harrell's C.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted, check_random_state
from torch import Tensor
from tqdm.auto import tqdm

from ..multimodal.mil import pad_bags
from .curves import BreslowBaseline, discrete_survival_at
from .labels import _plain, bin_index, split_survival, time_bins

# How the linear path on the tabular covariates is used, in order of preference under the one-standard-error
# rule of linear="auto": the elastic-net Cox alone, the Cox plus the network on top, the network alone.
LINEAR_MODES = ("only", "both", "none")
# where save_pretrained puts the end-to-end ViT's LoRA adapters (PEFT format) inside a saved model folder
LORA_FOLDER = "histology_lora"


def make_tabular_encoder():
    """Numeric columns: median-impute + standardize. Other columns: one-hot, unseen categories -> all zeros.

    Text columns that hold numbers (``"1.5"``, ``"2"``) are parsed first (:func:`numbers_from_text`), so a
    gene read as text is standardized like the others, never one-hot encoded level by level.
    """
    from sklearn.compose import make_column_selector, make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    return make_pipeline(
        FunctionTransformer(numbers_from_text, feature_names_out="one-to-one"),
        make_column_transformer(
            (
                make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
                make_column_selector(dtype_include="number"),
            ),
            (OneHotEncoder(handle_unknown="ignore", sparse_output=False), make_column_selector(dtype_exclude="number")),
            verbose_feature_names_out=False,
        ),
    )


def numbers_from_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns whose every value is a number -> float columns; text columns mixing numbers and words -> an error.

    A column of only words stays categorical. Mixed ones (``"1.5"`` beside ``"n/a"``) are refused, naming the
    column and rows, because neither reading is safe: as categories every number would be its own level, as
    numbers the words would silently become missing values.
    """
    if not isinstance(frame, pd.DataFrame):
        return frame
    parsed = {}
    for column in frame.columns:
        values = frame[column]
        if isinstance(values.dtype, pd.CategoricalDtype) or not (
            pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)
        ):
            continue
        numbers = pd.to_numeric(values.astype(object), errors="coerce")
        present, is_number = values.notna().to_numpy(), numbers.notna().to_numpy()
        if not is_number.any():
            continue  # categories
        words = present & ~is_number
        if words.any():
            number, word = np.flatnonzero(is_number)[0], np.flatnonzero(words)[0]
            number_row, word_row = _plain(values.index[number]), _plain(values.index[word])
            raise ValueError(
                f"column {column!r} mixes numbers and text: {values.iloc[number]!r} at row {number_row!r}, "
                f"{values.iloc[word]!r} at row {word_row!r} ({int(words.sum())} text value(s)); give it as "
                "numbers (empty cells for missing values) or as categories, not both"
            )
        parsed[column] = numbers.astype(float)
    if not parsed:
        return frame
    frame = frame.copy()
    for column, numbers in parsed.items():
        frame[column] = numbers
    return frame


@contextmanager
def _naming_cell(column: str, row) -> Iterator[None]:
    """Prefix a missing or unreadable file's error with the table cell that named it."""
    try:
        yield
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"column {column!r}, row {row!r}: {error}") from None


def _as_list(cell) -> list:
    """A cell of a path column: one path, a list of paths (a patient's slides), or missing."""
    if isinstance(cell, (list, tuple, np.ndarray)):
        return [c for c in cell if not pd.isna(c)]
    return [] if pd.isna(cell) else [cell]


def _nonfinite_cause(model, outputs) -> str:
    """What made a loss non-finite: a weight (an earlier update diverged) or the model's outputs for this batch."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            return f"the weights {name!r} are no longer finite (an earlier update diverged)"
    for name in ("risk", "logits"):
        value = getattr(outputs, name)
        if value is not None and not torch.isfinite(value).all():
            return f"the model's {name} are non-finite for {int((~torch.isfinite(value)).any(-1).sum())} patient(s)"
    return "the weights and outputs are finite, the loss itself overflowed"


class SurvivalEstimator(BaseEstimator):
    """Neural survival model with the scikit-survival API.

    The defaults are sized for small cohorts (a few hundred patients, tens to thousands of features),
    where overfitting is the main risk. ``linear="auto"`` compares, by ``selection_folds``-fold CV on the
    training data only, the elastic-net Cox alone (``"only"``), the Cox plus the network trained on top
    of its frozen linear predictor (``"both"``) and the network alone (``"none"``), and keeps the first of
    those, in that order, whose mean Harrell's C is within one standard error of the best (the
    one-standard-error rule: a more flexible model has to earn its place). The network is a one-layer SNN (features -> 16 SELU units) whose inputs carry
    a group-lasso penalty (0.05) that suppresses uninformative features, dropout 0.3, strong decoupled
    weight decay (1.0) and a fixed, short schedule (100 full-batch AdamW steps at lr 1e-2), settings
    chosen earlier on noise-augmented sksurv cohorts. ``linear="auto"`` with the discrete head was chosen
    leave-one-cohort-out over 11 public cohorts against a tuned Coxnet (``scripts/benchmark_survival.py``,
    ``scripts/select_survival_defaults.py``, docs/survival_benchmark.md). Wrap the estimator in
    ``GridSearchCV`` to tune on your own data.

    Reproducibility: with an int ``random_state`` the fit (inner CV folds, Coxnet's alpha search, weight
    init, dropout, shuffling) is seeded from it and the predictions are bit-identical across runs and
    processes (same library versions and thread count). The default ``None`` draws a fresh seed per fit,
    as scikit-learn estimators do; ``histomim``'s CV drivers replace it with their ``seed``.

    Args:
        head: ``"discrete"`` (default; it did better than Cox on the selection cohorts) or ``"cox"``
            (partial likelihood, Breslow baseline for survival curves); discrete:
            (``num_bins`` hazards at quantiles of the training event times, censored NLL).
        hidden_size: width of every modality embedding and of the fused embedding.
        genomic_hidden_sizes: SNN hidden widths before the ``hidden_size`` layer; ``()`` = one SNN layer.
        genomic_dropout: AlphaDropout of the SNN.
        dropout: dropout of the fusion layer and the head.
        num_bins: discrete-time bins (``head="discrete"``).
        cox_ties: ``"efron"`` or ``"breslow"`` (``head="cox"``).
        discrete_loss_alpha: PORPOISE's up-weighting of uncensored patients (``head="discrete"``).
        fusion: ``"concat"``, ``"bilinear"`` or ``"coattention"`` when several modalities are used.
        histology_col: column of ``X`` with tile-feature files (``(N, D)`` ``.safetensors`` from
            ``scripts/extract_features.py``, or ``.npy``; read by :func:`histomim.features.load_tile_features`),
            or lists of them (one per slide); a missing value means no slide for that patient.
        radiology_col: column of ``X`` with DICOM/NIfTI paths, loaded with
            :func:`histomim.data.radiology.load_scan` at ``radiology_size``.
        radiology_size: size every scan is resampled to (per spatial axis).
        histology_encoder: a histomim encoder (saved folder or Hub id, loaded with ``AutoModel``) that makes
            the histology path end to end: the ``histology_col`` cells are then whole-slide files (tiled on the
            fly at the encoder's ``target_mpp`` and ``image_size``), `histomim tile` folders, tile manifests or
            folders of tile images (or lists of them), and their tiles pass through this ViT while training.
        histology_tiles_per_slide: tiles kept per slide or tile source for the end-to-end path, spread evenly
            over it (the same tiles at fit and predict time); ``None`` = all (memory grows with it).
        lora_rank: rank of the LoRA adapters trained on the end-to-end ViT (the base weights stay frozen);
            ``0`` freezes the ViT and trains only the MIL, fusion and head.
        lora_alpha: LoRA scaling (``None`` = ``2 * lora_rank``).
        lora_target_modules: the ViT's linear layers that get adapters: ``"qkv"`` (attention input),
            ``"proj"`` (attention output), ``"fc1"``/``"fc2"`` (MLP).
        linear: ``"auto"`` (default, see above), ``"only"``, ``"both"`` or ``"none"``; any mode but
            ``"none"`` needs tabular columns. The saved model holds the linear path
            (``config.genomic_linear``), so it reproduces the estimator's risks on its own.
        linear_l1_ratio: elastic-net mixing of the linear path's Coxnet (1 = lasso).
        selection_folds: inner folds of ``linear="auto"``.
        pathways: ``{pathway: [column, ...]}`` over the encoded tabular columns (one-hot columns are
            named ``<column>_<level>``): the genes become one token per pathway, each from its own SNN.
        modality_dropout: probability of hiding a present modality of a patient during training.
        histology_max_tiles: tiles sampled per patient and step while training (``None`` = all).
        group_lasso: strength of a group-lasso penalty on the first genomic layer, ``group_lasso *
            sum_j ||W[:, j]||_2`` added to the loss (one group per input feature). Unlike weight decay,
            which AdamW applies regardless of the gradient, it keeps a feature's weights near zero unless
            its loss gradient outweighs the penalty, so uninformative columns are suppressed as by
            Coxnet's L1 penalty. ``0`` disables it.
        n_networks: networks trained from different seeds on the same data whose predictions are
            averaged (Cox: mean log hazard ratio; discrete: mean survival per bin); more networks
            lower the variance of small-cohort fits at proportional training cost.
        epochs: full passes over the training set (fixed; no early stopping).
        batch_size: patients per step; ``None`` = the whole training set (exact Cox risk sets).
        learning_rate, weight_decay: AdamW settings.
        random_state: seed for weight init, dropout and shuffling; ``None`` is not reproducible.
        device: torch device to train on.
        verbose: show a progress bar over epochs.
    """

    def __init__(
        self,
        head: str = "discrete",
        hidden_size: int = 16,
        genomic_hidden_sizes: Sequence[int] = (),
        genomic_dropout: float = 0.3,
        dropout: float = 0.3,
        num_bins: int = 4,
        cox_ties: str = "efron",
        discrete_loss_alpha: float = 0.0,
        fusion: str = "concat",
        histology_col: str | None = None,
        radiology_col: str | None = None,
        radiology_size: int = 64,
        histology_encoder: str | None = None,
        histology_tiles_per_slide: int | None = 16,
        lora_rank: int = 8,
        lora_alpha: int | None = None,
        lora_target_modules: Sequence[str] = ("qkv",),
        linear: str = "auto",
        linear_l1_ratio: float = 0.5,
        selection_folds: int = 3,
        pathways: Mapping[str, Sequence[str]] | None = None,
        modality_dropout: float = 0.0,
        histology_max_tiles: int | None = None,
        group_lasso: float = 0.05,
        n_networks: int = 1,
        epochs: int = 100,
        batch_size: int | None = None,
        learning_rate: float = 1e-2,
        weight_decay: float = 1.0,
        random_state: int | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = False,
    ):
        self.head = head
        self.hidden_size = hidden_size
        self.genomic_hidden_sizes = genomic_hidden_sizes
        self.genomic_dropout = genomic_dropout
        self.dropout = dropout
        self.num_bins = num_bins
        self.cox_ties = cox_ties
        self.discrete_loss_alpha = discrete_loss_alpha
        self.fusion = fusion
        self.histology_col = histology_col
        self.radiology_col = radiology_col
        self.radiology_size = radiology_size
        self.histology_encoder = histology_encoder
        self.histology_tiles_per_slide = histology_tiles_per_slide
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_target_modules = lora_target_modules
        self.linear = linear
        self.linear_l1_ratio = linear_l1_ratio
        self.selection_folds = selection_folds
        self.pathways = pathways
        self.modality_dropout = modality_dropout
        self.histology_max_tiles = histology_max_tiles
        self.group_lasso = group_lasso
        self.n_networks = n_networks
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------------------------ inputs

    def _as_frame(self, X) -> pd.DataFrame:
        if isinstance(X, pd.DataFrame):
            return X
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (patients x features), got shape {X.shape}")
        return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])

    def _path_cols(self) -> list[str]:
        return [c for c in (self.histology_col, self.radiology_col) if c is not None]

    def _modalities(self, frame: pd.DataFrame) -> list[str]:
        missing = [c for c in self._path_cols() if c not in frame.columns]
        if missing:
            raise KeyError(f"column(s) {missing} not in X; available columns: {list(frame.columns)}")
        modalities = ["genomic"] if len(frame.columns) > len(self._path_cols()) else []  # any tabular column
        if self.histology_col is not None:
            modalities.append("histology")
        if self.radiology_col is not None:
            modalities.append("radiology")
        if not modalities:
            raise ValueError("X has no columns to learn from")
        return modalities

    def _load_inputs(self, frame: pd.DataFrame, fit: bool) -> dict[str, object]:
        """Per-modality model inputs for every row: a genomic matrix, tile bags, scans."""
        inputs: dict[str, object] = {}
        tabular = frame.drop(columns=self._path_cols())
        if "genomic" in self.modalities_:
            encoded = self.encoder_.fit_transform(tabular) if fit else self.encoder_.transform(tabular)
            encoded = np.array(encoded, dtype=np.float32)  # (N, G)
            # no value in any tabular column: the patient lacks that modality (a NaN row is masked by the
            # model, like a missing slide), rather than being imputed into an average patient
            encoded[tabular.isna().all(axis=1).to_numpy()] = np.nan
            inputs["genomic"] = torch.from_numpy(encoded)
        if self.histology_col is not None:
            # tile features: the width D is the fitted model's, or at fit time the first file's; a file of another
            # width is named
            features = self.histology_encoder is None
            width = None if fit or not features else self.models_[0].config.histology_feature_dim
            bags = []
            for row, cell in frame[self.histology_col].items():
                slides = []
                for file in _as_list(cell):
                    with _naming_cell(self.histology_col, row):
                        bag = self._histology_bag(file)  # (N_s, D) features or (N_s, C, H, W) tile pixels
                        width = width or bag.shape[1]
                        if features and bag.shape[1] != width:
                            what = "the model was fitted on" if not fit else "earlier files hold"
                            raise ValueError(f"{file}: tile features are {bag.shape[1]} wide, {what} {width}")
                    slides.append(bag)
                bags.append(torch.cat(slides) if slides else None)
            inputs["histology"] = bags  # [(N_i, D) or (N_i, C, H, W), or None]
        if self.radiology_col is not None:
            from ..data.radiology import load_scan

            scans = []
            for row, cell in frame[self.radiology_col].items():
                files = _as_list(cell)
                if len(files) > 1:
                    raise ValueError(
                        f"column {self.radiology_col!r}, row {row!r}: one scan per patient, got {len(files)}"
                    )
                with _naming_cell(self.radiology_col, row):
                    scans.append(load_scan(files[0], size=self.radiology_size) if files else None)  # (1, *spatial)
            inputs["radiology"] = scans
        return inputs

    def _histology_bag(self, source) -> Tensor:
        """One slide's bag: its tile features ``(N, D)``, or with ``histology_encoder`` its preprocessed tiles
        ``(N, C, H, W)`` (kept in ``_tile_bags`` during a fit, so the inner-CV refits tile each slide once)."""
        if self.histology_encoder is None:
            from ..features import load_tile_features

            return load_tile_features(source)
        from ..data.bags import tile_bag

        cache = getattr(self, "_tile_bags", {})
        key = str(Path(source).resolve())
        if key not in cache:
            config = self.histology_encoder_config_
            cache[key] = tile_bag(
                source, self.histology_processor_, config.target_mpp or 0.5, config.image_size,
                self.histology_tiles_per_slide,
            )  # fmt: skip
        return cache[key]

    def _load_histology_encoder(self) -> None:
        """The pretrained ViT of the end-to-end histology path: its config, weights and image processor."""
        from ..features import load_encoder
        from ..mim.image_processing_histomim import image_processor_for

        encoder = load_encoder(self.histology_encoder)
        if encoder.config.model_type != "histomim":
            raise ValueError(
                f"histology_encoder={self.histology_encoder!r} is a {encoder.config.model_type!r} model; the end-to-end "
                "histology path takes a histomim encoder (extract features with other encoders instead)"
            )
        self.histology_encoder_config_ = encoder.config
        self.histology_processor_ = image_processor_for(encoder.config)
        self._histology_weights = encoder.state_dict()

    def _batch(self, inputs: dict[str, object], rows: np.ndarray) -> dict[str, Tensor]:
        """Model keyword arguments for ``rows``; absent modalities become NaN rows / empty bags."""
        batch: dict[str, Tensor] = {}
        if "genomic" in inputs:
            batch["genomic"] = inputs["genomic"][rows]  # (b, G)
        if "histology" in inputs:
            config = self.models_[0].config
            if config.histology_encoder is None:
                item_shape = (config.histology_feature_dim,)
            else:
                size = config.histology_encoder.image_size
                item_shape = (config.histology_encoder.num_channels, size, size)
            bags = [inputs["histology"][r] for r in rows]
            batch["histology"], batch["histology_mask"] = pad_bags(bags, item_shape)
        if "radiology" in inputs:
            config = self.models_[0].config
            shape = (config.radiology_num_channels, *config.radiology_image_size)
            scans = [inputs["radiology"][r] for r in rows]
            batch["radiology"] = torch.stack([s if s is not None else torch.full(shape, float("nan")) for s in scans])
        return {name: value.to(self.device) for name, value in batch.items()}

    # ------------------------------------------------------------------------------------ model

    def _build_model(self, inputs: dict[str, object], linear_coef: np.ndarray | None):
        """A fresh fusion model; with ``linear_coef`` its linear path holds those (frozen) coefficients, and
        for ``linear_="only"`` the head ignores the fused embedding (zero, frozen weights)."""
        from ..multimodal.configuration_fusion import HistoFusionConfig
        from ..multimodal.genomic import pathway_assignment
        from ..multimodal.modeling_fusion import HistoFusionForSurvival

        settings = {}
        if "genomic" in inputs:
            names = [str(n) for n in self.encoder_.get_feature_names_out()]
            settings.update(
                genomic_num_features=inputs["genomic"].shape[1],
                genomic_hidden_sizes=list(self.genomic_hidden_sizes),
                genomic_dropout=self.genomic_dropout,
                genomic_feature_names=names,
                genomic_pathways=pathway_assignment(names, self.pathways) if self.pathways else None,
                genomic_linear=linear_coef is not None,
            )
        if "histology" in inputs and self.histology_encoder is not None:
            settings["histology_encoder"] = self.histology_encoder_config_
        elif "histology" in inputs:
            dims = {b.shape[1] for b in inputs["histology"] if b is not None}
            if len(dims) != 1:
                raise ValueError(
                    f"column {self.histology_col!r}: tile features need one width D across patients, got {sorted(dims)}"
                )
            settings["histology_feature_dim"] = dims.pop()
        if "radiology" in inputs:
            shapes = {tuple(s.shape) for s in inputs["radiology"] if s is not None}
            if len(shapes) != 1:
                raise ValueError(
                    f"column {self.radiology_col!r}: scans differ in shape after resampling: {sorted(shapes)}"
                )
            channels, *spatial = shapes.pop()
            settings.update(
                radiology_spatial_dims=len(spatial), radiology_num_channels=channels, radiology_image_size=spatial
            )
        config = HistoFusionConfig(
            modalities=self.modalities_,
            hidden_size=self.hidden_size,
            fusion=self.fusion,
            head=self.head,
            num_bins=self.num_bins,
            dropout=self.dropout,
            num_attention_heads=1,  # co-attention over a small hidden_size: one head keeps every head wide enough
            cox_ties=self.cox_ties,
            discrete_loss_alpha=self.discrete_loss_alpha,
            modality_dropout=self.modality_dropout,
            histology_max_tiles=self.histology_max_tiles,
            **settings,
        )
        model = HistoFusionForSurvival(config)
        if self.histology_encoder is not None:
            model.histology_encoder.encoder.load_state_dict(self._histology_weights)
        if linear_coef is not None:
            with torch.no_grad():
                model.genomic_linear.weight.copy_(torch.as_tensor(linear_coef, dtype=torch.float32)[None])
            model.genomic_linear.requires_grad_(False)  # the network learns what the linear model misses
        if self.linear_ == "only":
            # risk = x . beta (Cox) or bin baselines + x . beta (discrete): only the head's bias still trains
            with torch.no_grad():
                model.survival_head.linear.weight.zero_()
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name == "survival_head.linear.bias")
        elif self.histology_encoder is not None:
            self._adapt_histology_encoder(model)
        return model.to(self.device)

    def _adapt_histology_encoder(self, model) -> None:
        """Freeze the end-to-end ViT and, with ``lora_rank``, wrap it in trainable PEFT LoRA adapters."""
        from ..lora import add_lora

        tiles = model.histology_encoder
        if not self.lora_rank:
            tiles.encoder.requires_grad_(False)
            return
        alpha = self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank
        tiles.encoder = add_lora(tiles.encoder, r=self.lora_rank, lora_alpha=alpha, target_modules=self.lora_target_modules)

    def _merge_lora(self, model) -> dict | None:
        """Fold a trained model's LoRA adapters into its ViT weights (what is saved and predicts) and return
        the adapters in PEFT's format, ``{"config": LoraConfig, "weights": {name: tensor}}``, to save beside it."""
        tiles = getattr(model, "histology_encoder", None)
        if not hasattr(getattr(tiles, "encoder", None), "peft_config"):
            return None
        from peft import get_peft_model_state_dict

        adapter = {
            "config": tiles.encoder.peft_config["default"],
            "weights": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(tiles.encoder).items()},
        }
        tiles.encoder = tiles.encoder.merge_and_unload()
        return adapter

    def _lasso_weights(self, model) -> list[Tensor]:
        """First genomic layer(s) ``(H, G_p)`` whose input columns carry the group lasso (one per pathway)."""
        if not self.group_lasso or "genomic" not in self.modalities_:
            return []
        encoder = model.genomic_encoder
        encoders = encoder.encoders if hasattr(encoder, "encoders") else [encoder]  # pathway SNNs or one SNN
        return [e.blocks[0][0].weight for e in encoders if e.blocks[0][0].weight.requires_grad]

    def _train(
        self, model, inputs: dict[str, object], event: np.ndarray, time: np.ndarray, generator: torch.Generator
    ) -> list[float]:
        """Train one network in place; returns its loss (without the group-lasso term) per epoch."""
        labels = {"event": torch.as_tensor(event), "time": torch.as_tensor(time, dtype=torch.float32)}
        if self.head == "discrete":
            labels["bin_index"] = torch.as_tensor(bin_index(time, self.bin_edges_))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:  # linear="only" with a Cox head: the Coxnet fit is the whole model
            model.eval()
            return []
        optimizer = torch.optim.AdamW(trainable, lr=self.learning_rate, weight_decay=self.weight_decay)
        lasso_weights = self._lasso_weights(model)  # first genomic layer(s): one lasso group per input column
        num_rows = len(event)
        batch_size = num_rows if self.batch_size is None else self.batch_size
        history = []
        model.train()
        for epoch in range(self.epochs):
            order = torch.randperm(num_rows, generator=generator).numpy()
            epoch_loss = 0.0
            for step, start in enumerate(range(0, num_rows, batch_size)):
                rows = order[start : start + batch_size]
                batch_labels = {name: value[rows].to(self.device) for name, value in labels.items()}
                outputs = model(**self._batch(inputs, rows), **batch_labels)
                loss = outputs.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"survival loss is {loss.item()} at epoch {epoch + 1}/{self.epochs}, step {step + 1}: "
                        f"{_nonfinite_cause(model, outputs)}; lower learning_rate (now {self.learning_rate:g})"
                    )
                epoch_loss += loss.item() * len(rows) / num_rows
                for weight in lasso_weights:
                    loss = loss + self.group_lasso * weight.norm(dim=0).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            history.append(epoch_loss)
        model.eval()
        return history

    # ------------------------------------------------------------------------------------ API

    def fit(self, X, y) -> "SurvivalEstimator":
        """Fit on features ``X`` (DataFrame or array, one row per patient) and sksurv outcomes ``y``."""
        event, time = split_survival(y)
        frame = self._as_frame(X)
        if len(frame) != len(event):
            raise ValueError(f"X has {len(frame)} rows but y has {len(event)} outcomes")
        if len(event) < 2:
            raise ValueError(f"y holds {len(event)} patient(s); fitting a survival model needs at least 2")
        if not event.any():
            raise ValueError("y has no events; a survival model cannot be fitted")
        if self.head not in ("cox", "discrete"):
            raise ValueError(f"`head` must be 'cox' or 'discrete', got {self.head!r}")
        if self.linear not in (*LINEAR_MODES, "auto"):
            raise ValueError(f"`linear` must be 'auto' or one of {LINEAR_MODES}, got {self.linear!r}")
        self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        self.n_features_in_ = len(frame.columns)
        self.modalities_ = self._modalities(frame)
        if self.linear not in ("auto", "none") and "genomic" not in self.modalities_:
            raise ValueError(f"linear={self.linear!r} needs tabular columns in X; use linear='none'")
        if self.histology_encoder is not None and self.histology_col is None:
            raise ValueError("histology_encoder encodes the slides of histology_col: set histology_col too")
        # one seed for everything below: inner folds, Coxnet's alpha search, init, dropout, shuffling. An int is
        # used as is, so the linear path's Coxnet is the very fit of CoxnetCV(random_state=<that int>)
        if isinstance(self.random_state, numbers.Integral):
            seed = int(self.random_state)
        else:
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

        owns_tile_cache = not hasattr(self, "_tile_bags")  # the inner-CV refits share their caller's tiles
        if owns_tile_cache:
            self._tile_bags = {}
        try:
            if self.histology_encoder is not None:
                self._load_histology_encoder()
            self._fit(frame, y, event, time, seed)
        finally:
            if owns_tile_cache:
                del self._tile_bags
            self.__dict__.pop("_histology_weights", None)  # the fitted models hold them now
        return self

    def _fit(self, frame: pd.DataFrame, y: np.ndarray, event: np.ndarray, time: np.ndarray, seed: int) -> None:
        self.linear_ = self.linear
        if self.linear == "auto":
            self.linear_ = self._select_linear_mode(frame, y, seed) if "genomic" in self.modalities_ else "none"
        self.encoder_ = make_tabular_encoder()
        if self.head == "discrete":
            self.bin_edges_ = time_bins(time, event, self.num_bins)
        inputs = self._load_inputs(frame, fit=True)
        linear_coef = self._fit_linear(frame, y, seed) if self.linear_ != "none" else None

        generator = torch.Generator().manual_seed(seed)
        # a private RNG stream: reproducible init and dropout without touching the caller's global RNG
        gpu = [self.device] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=gpu):
            torch.manual_seed(seed)
            self.models_, histories, adapters = [], [], []
            for _ in tqdm(range(self.n_networks), desc="networks", disable=not self.verbose, leave=False):
                self.models_.append(self._build_model(inputs, linear_coef))
                histories.append(self._train(self.models_[-1], inputs, event, time, generator))
                adapters.append(self._merge_lora(self.models_[-1]))
        self.lora_adapters_ = adapters if any(adapters) else None
        self.model_ = self.models_[0]
        self.loss_history_ = list(np.mean(histories, axis=0)) if histories[0] else []

        # grid of the survival functions: the training times as in sksurv's models, plus 0 where S = 1
        self.unique_times_ = np.unique(np.r_[0.0, time])
        if self.head == "cox":
            self.baseline_ = BreslowBaseline().fit(self._forward(inputs)[0], time, event)

    def _fit_linear(self, frame: pd.DataFrame, y: np.ndarray, seed: int) -> np.ndarray:
        """Coefficients ``(G,)`` of an elastic-net Cox on the encoded tabular covariates, alpha by inner CV."""
        from .baselines import CoxnetCV

        # (N, G) the model's standardized input, in float64 as sksurv's own pipeline sees it
        genomic = np.asarray(self.encoder_.transform(frame.drop(columns=self._path_cols())), dtype=float)
        self.linear_model_ = CoxnetCV(l1_ratio=self.linear_l1_ratio, random_state=seed).fit(genomic, y)
        return self.linear_model_.coef_

    def _select_linear_mode(self, frame: pd.DataFrame, y: np.ndarray, seed: int) -> str:
        """``linear="auto"``: inner-CV Harrell's C of every mode in :data:`LINEAR_MODES` on the training data,
        then the first mode whose mean is within one standard error of the best mode's mean."""
        from sklearn.model_selection import StratifiedKFold

        event, _ = split_survival(y)
        if min(event.sum(), (~event).sum()) < self.selection_folds:
            raise ValueError(
                f"linear='auto' needs at least {self.selection_folds} patients with and without an event "
                "(selection_folds); choose linear= explicitly"
            )
        folds = StratifiedKFold(self.selection_folds, shuffle=True, random_state=seed)
        scores = {mode: [] for mode in LINEAR_MODES}
        for train, valid in folds.split(frame, event):
            for mode in LINEAR_MODES:
                model = clone(self).set_params(linear=mode, random_state=seed, verbose=False)
                model._tile_bags = self._tile_bags
                scores[mode].append(model.fit(frame.iloc[train], y[train]).score(frame.iloc[valid], y[valid]))
        self.selection_scores_ = {
            mode: {"mean": float(np.mean(c)), "se": float(np.std(c, ddof=1) / np.sqrt(len(c)))}
            for mode, c in scores.items()
        }
        best = max(LINEAR_MODES, key=lambda mode: self.selection_scores_[mode]["mean"])
        threshold = self.selection_scores_[best]["mean"] - self.selection_scores_[best]["se"]
        return next(mode for mode in LINEAR_MODES if self.selection_scores_[mode]["mean"] >= threshold)

    @torch.no_grad()
    def _forward(self, inputs: dict[str, object]) -> tuple[np.ndarray, np.ndarray | None]:
        """Ensemble outputs for every row: risk ``(N,)`` and, for the discrete head, survival per bin ``(N, K)``."""
        num_rows = len(next(iter(inputs.values())))
        batch = self._batch(inputs, np.arange(num_rows))
        outputs = [model.eval()(**batch) for model in self.models_]
        if self.head == "cox":
            return torch.stack([o.risk for o in outputs]).mean(0).cpu().double().numpy(), None
        survival = torch.stack([o.survival for o in outputs]).mean(0).cpu().double().numpy()
        return -survival.sum(axis=1), survival  # the discrete risk -sum_k S_k of the averaged curve

    def _predict_inputs(self, X) -> dict[str, object]:
        check_is_fitted(self, "model_")
        frame = self._as_frame(X)
        if list(frame.columns) != list(self.feature_names_in_):
            raise ValueError(
                f"X has columns {list(frame.columns)}, but the estimator was fitted with {list(self.feature_names_in_)}"
            )
        return self._load_inputs(frame, fit=False)

    def predict(self, X) -> np.ndarray:
        """Risk scores ``(N,)``, higher = worse (log hazard ratio for Cox, ``-sum_k S_k`` for discrete time)."""
        return self._forward(self._predict_inputs(X))[0]

    def predict_survival_function(self, X, return_array: bool = False):
        """Survival functions on the training time grid ``unique_times_``.

        Returns ``StepFunction``s (sksurv), or with ``return_array=True`` an array ``(N, len(unique_times_))``.
        """
        risk, bins = self._forward(self._predict_inputs(X))
        if self.head == "cox":
            survival = self.baseline_.survival(risk, self.unique_times_)  # (N, T)
        else:
            survival = discrete_survival_at(bins, self.bin_edges_, self.unique_times_)
        if return_array:
            return survival
        from sksurv.functions import StepFunction

        return np.array([StepFunction(self.unique_times_, curve) for curve in survival])

    def model_inputs(self, X) -> dict[str, Tensor]:
        """The keyword arguments the saved ``HistoFusionForSurvival`` takes for the rows of ``X`` (encoded
        tabular matrix, padded tile bags, scans), e.g. ``AutoModel.from_pretrained(path)(**inputs).risk``."""
        inputs = self._predict_inputs(X)
        return self._batch(inputs, np.arange(len(next(iter(inputs.values())))))

    @torch.no_grad()
    def predict_attention(self, X) -> list[np.ndarray]:
        """Per row of ``X``, the ABMIL attention over its tiles ``(N_i,)`` (in the order of its feature files,
        summing to 1; averaged over a seed ensemble; empty for a row without tiles): the per-tile scores that
        `histomim.slide_maps` draws over the slide and exports to QuPath."""
        if self.histology_col is None:
            raise ValueError("predict_attention needs tile features: the estimator was fitted without histology_col")
        inputs = self._predict_inputs(X)
        batch = self._batch(inputs, np.arange(len(inputs["histology"])))
        attention = torch.stack([model.eval()(**batch).histology_attention for model in self.models_]).mean(0)  # (B, N)
        mask = batch["histology_mask"]  # (B, N)
        return [attention[i][mask[i]].cpu().double().numpy() for i in range(len(mask))]

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Save the fitted fusion model(s) with ``save_pretrained`` (safetensors + config + remote code):
        ``directory`` itself for one network, ``directory/network_<i>`` for a seed ensemble.

        With an end-to-end LoRA-tuned ViT the saved weights hold the merged adapters (so ``AutoModel`` gives
        this estimator's risks), and ``<folder>/histology_lora`` holds the adapters alone in PEFT's format:
        ``PeftModel.from_pretrained(AutoModel.from_pretrained(histology_encoder), <folder>/histology_lora)`` is
        the fine-tuned tile encoder, e.g. for feature extraction."""
        from ..atomic import atomic_path

        check_is_fitted(self, "model_")
        directory = Path(directory)
        folders = [directory] if len(self.models_) == 1 else [directory / f"network_{i}" for i in range(len(self.models_))]
        adapters = self.lora_adapters_ or [None] * len(self.models_)
        for model, adapter, folder in zip(self.models_, adapters, folders):
            model.save_pretrained(folder)
            if adapter is not None:
                from safetensors.torch import save_file

                adapter["config"].save_pretrained(folder / LORA_FOLDER)  # adapter_config.json
                with atomic_path(folder / LORA_FOLDER / "adapter_model.safetensors") as partial:
                    save_file(adapter["weights"], str(partial))
        return folders

    def score(self, X, y) -> float:
        """Harrell's concordance index of ``predict(X)`` against ``y``."""
        from sksurv.metrics import concordance_index_censored

        event, time = split_survival(y)
        return float(concordance_index_censored(event, time, self.predict(X))[0])
