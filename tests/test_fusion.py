"""Fusion operators and HistoFusionForSurvival on real inputs.

The cohort: the 198 real breast-cancer patients' 76 gene-expression probes (sksurv), a bag of real
H&E tile features per patient (tiles of the CMU-1 sample slide) and a real CT or MR crop per
patient (pydicom's examples), with a simulated outcome whose rule is written in `cohort`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import colour_features
from safetensors.torch import save_file
from test_loading import make_hub_cache, run_without_histomim
from transformers import AutoConfig, AutoModel

from histomim.multimodal.configuration_fusion import HistoFusionConfig
from histomim.multimodal.fusion import BilinearFusion, drop_modalities
from histomim.multimodal.modeling_fusion import HistoFusionForSurvival

TILES_PER_PATIENT = 8


@pytest.fixture(scope="module")
def cohort() -> dict[str, torch.Tensor]:
    """Real inputs per patient, and exponential survival times from this rule:

        log hazard = 2 * (gene_score + histology_score)

    gene_score: the first principal component of the patient's real (standardized) expression
    profile, standardized. histology_score: the mean hematoxylin density of the patient's bag of
    real H&E tiles, standardized (bags are drawn around a random per-patient nuclear-density
    grade). Radiology is a real CT or MR crop that does not enter the rule. 25% of patients are
    censored at random.
    """
    import pydicom.examples
    import tiffslide
    from sksurv.datasets import load_breast_cancer

    from histomim.data.samples import sample_slide_path
    from histomim.data.radiology import load_scan

    generator = torch.Generator().manual_seed(0)
    features, _ = load_breast_cancer()
    probes = features[[c for c in features.columns if c.startswith("X")]].astype(float)
    genes = torch.tensor(((probes - probes.mean()) / probes.std()).values, dtype=torch.float32)  # (198, 76)
    num_patients = len(genes)

    slide = tiffslide.TiffSlide(sample_slide_path())
    tiles = torch.from_numpy(colour_features(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))))
    by_density = tiles[:, 0].argsort()  # tissue tiles from low to high hematoxylin density
    num_tiles = len(tiles)
    grade = torch.rand(num_patients, generator=generator)  # (P,) position in the density ranking
    centre = (0.1 + 0.8 * grade) * (num_tiles - 1)
    offsets = torch.randint(-num_tiles // 10, num_tiles // 10, (num_patients, TILES_PER_PATIENT), generator=generator)
    bags = tiles[by_density[(centre.long()[:, None] + offsets).clamp(0, num_tiles - 1)]]  # (P, 8, 9)

    ct = load_scan(pydicom.examples.get_path("ct"), window="soft_tissue")  # (1, 128, 128)
    mr = load_scan(pydicom.examples.get_path("mr"), size=128)  # (1, 128, 128)
    scans = torch.empty(num_patients, 1, 32, 32)
    for patient in range(num_patients):
        image = ct if torch.rand(1, generator=generator) < 0.5 else mr
        y, x = torch.randint(0, 64, (2,), generator=generator).tolist()
        crop = torch.nn.functional.avg_pool2d(image[:, y : y + 64, x : x + 64], 2)  # (1, 32, 32)
        scans[patient] = crop.flip(-1) if torch.rand(1, generator=generator) < 0.5 else crop

    def standardize(values: torch.Tensor) -> torch.Tensor:
        return (values - values.mean()) / values.std()

    gene_score = standardize(genes @ torch.linalg.svd(genes, full_matrices=False).Vh[0])
    histology_score = standardize(bags[:, :, 0].mean(dim=1))
    log_hazard = 2.0 * (gene_score + histology_score)
    time = -torch.log(torch.rand(num_patients, generator=generator)) / log_hazard.exp()
    event = torch.rand(num_patients, generator=generator) < 0.75

    order = torch.randperm(num_patients, generator=generator)
    return {
        "genomic": genes,
        "histology": (bags - tiles.mean(0)) / tiles.std(0),
        "radiology": scans,
        "time": time,
        "event": event,
        "train": order[:130],
        "test": order[130:],
    }


def make_config(modalities, **overrides) -> HistoFusionConfig:
    settings = {
        "modalities": modalities,
        "hidden_size": 16,
        "genomic_num_features": 76,
        "genomic_hidden_sizes": [32],
        "histology_feature_dim": 9,
        "histology_attention_dim": 8,
        "radiology_channels": [8, 16],
        "dropout": 0.1,
    }
    settings.update(overrides)
    return HistoFusionConfig(**settings)


def inputs_of(cohort, modalities, rows) -> dict[str, torch.Tensor]:
    return {name: cohort[name][rows] for name in modalities}


def train_cox(config: HistoFusionConfig, inputs: dict, time: torch.Tensor, event: torch.Tensor, epochs: int = 80):
    torch.manual_seed(0)
    model = HistoFusionForSurvival(config)
    # strong L2 regularizes the SNN on 76 genes x 130 patients
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(epochs):
        loss = model(**inputs, time=time, event=event).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def cindex(model, inputs, time, event, rows=slice(None), **kwargs) -> float:
    from sksurv.metrics import concordance_index_censored

    with torch.no_grad():
        risk = model(**inputs, **kwargs).risk
    assert torch.isfinite(risk).all()
    return concordance_index_censored(event[rows].numpy(), time[rows].numpy(), risk[rows].numpy())[0]


def test_fused_model_beats_every_single_modality_and_copes_with_missing_ones(cohort):
    train, test = cohort["train"], cohort["test"]
    time, event = cohort["time"], cohort["event"]
    all_modalities = ["genomic", "histology", "radiology"]

    single = {}
    for name in all_modalities:
        model = train_cox(make_config([name]), inputs_of(cohort, [name], train), time[train], event[train])
        single[name] = (model, cindex(model, inputs_of(cohort, [name], test), time[test], event[test]))

    # train the fused model with modalities missing for 15-20% of the patients each, and modality dropout
    fused_inputs = inputs_of(cohort, all_modalities, train)
    fused_inputs = {name: value.clone() for name, value in fused_inputs.items()}
    draw = torch.rand(len(train), generator=torch.Generator().manual_seed(1))
    fused_inputs["genomic"][draw < 0.15] = float("nan")  # NaN marks a missing gene profile
    histology_mask = torch.ones(len(train), TILES_PER_PATIENT, dtype=torch.bool)
    histology_mask[(draw >= 0.15) & (draw < 0.3)] = False  # an empty bag marks missing histology
    fused_inputs["radiology"][(draw >= 0.3) & (draw < 0.5)] = float("nan")
    fused = train_cox(
        make_config(all_modalities, modality_dropout=0.15),
        {**fused_inputs, "histology_mask": histology_mask},
        time[train],
        event[train],
    )

    test_inputs = inputs_of(cohort, all_modalities, test)
    fused_cindex = cindex(fused, test_inputs, time[test], event[test])
    best_single = max(c for _, c in single.values())
    assert fused_cindex > best_single + 0.02, (fused_cindex, {k: c for k, (_, c) in single.items()})
    assert single["radiology"][1] < 0.6  # radiology is not in the rule: near chance

    # at test time, hide histology for every other patient
    hidden = torch.zeros(len(test), dtype=torch.bool)
    hidden[::2] = True
    modality_mask = torch.ones(len(test), 3, dtype=torch.bool)
    modality_mask[hidden, 1] = False
    partial_cindex = cindex(fused, test_inputs, time[test], event[test], modality_mask=modality_mask)
    assert partial_cindex < fused_cindex  # histology helps where it is present ...
    assert partial_cindex > 0.65  # ... and the model still ranks well without it
    # on the patients without histology the fused model falls back to about the genomic model's ranking
    genomic_model = single["genomic"][0]
    genomic_on_hidden = cindex(genomic_model, inputs_of(cohort, ["genomic"], test), time[test], event[test], rows=hidden)
    fused_on_hidden = cindex(fused, test_inputs, time[test], event[test], rows=hidden, modality_mask=modality_mask)
    assert fused_on_hidden > genomic_on_hidden - 0.05, (fused_on_hidden, genomic_on_hidden)


@pytest.mark.parametrize("fusion", ["concat", "bilinear", "coattention"])
def test_a_missing_modality_input_has_no_influence(cohort, fusion):
    torch.manual_seed(0)
    config = make_config(["genomic", "histology", "radiology"], fusion=fusion, head="discrete", num_bins=4)
    model = HistoFusionForSurvival(config).eval()
    rows = cohort["test"][:6]
    inputs = inputs_of(cohort, ["genomic", "histology", "radiology"], rows)
    modality_mask = torch.ones(6, 3, dtype=torch.bool)
    modality_mask[0, 0] = False  # patient 0: no genomics (the co-attention query modality)
    modality_mask[1, 1] = False  # patient 1: no histology
    modality_mask[2, 1:] = False  # patient 2: genomics only

    with torch.no_grad():
        reference = model(**inputs, modality_mask=modality_mask)
        changed = {name: value.clone() for name, value in inputs.items()}
        changed["genomic"][0] = torch.randn(76)
        changed["histology"][1:3] = torch.randn(2, TILES_PER_PATIENT, 9)
        changed["radiology"][2] = torch.rand(1, 32, 32)
        changed["genomic"][3] += 1.0  # patient 3 has everything: a real change
        output = model(**changed, modality_mask=modality_mask)
    torch.testing.assert_close(output.risk[:3], reference.risk[:3])
    assert not torch.allclose(output.risk[3], reference.risk[3])
    # discrete head: hazards in (0, 1), survival non-increasing over bins, risk = -sum_k S_k
    assert output.hazards.shape == (6, 4) and bool(((output.hazards > 0) & (output.hazards < 1)).all())
    assert bool((output.survival[:, 1:] <= output.survival[:, :-1]).all())
    torch.testing.assert_close(output.risk, -output.survival.sum(dim=1))


def test_a_modality_absent_from_the_batch_counts_as_missing(cohort):
    torch.manual_seed(0)
    model = HistoFusionForSurvival(make_config(["genomic", "histology"])).eval()
    rows = cohort["test"][:4]
    with torch.no_grad():
        genomic_only = model(genomic=cohort["genomic"][rows])
        explicit = model(
            genomic=cohort["genomic"][rows],
            histology=cohort["histology"][rows],
            modality_mask=torch.tensor([[True, False]] * 4),
        )
    torch.testing.assert_close(genomic_only.risk, explicit.risk)
    assert genomic_only.modality_mask.tolist() == [[True, False]] * 4


def test_drop_modalities_never_removes_every_modality():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2000, 3, generator=generator) < 0.7
    mask[~mask.any(dim=1), 0] = True  # every patient has at least one modality
    dropped = drop_modalities(mask, 0.3, generator)
    assert bool(dropped.any(dim=1).all())
    assert not bool((dropped & ~mask).any())  # only present modalities are hidden
    rate = 1 - dropped.sum() / mask.sum()
    assert 0.2 < rate < 0.3  # a bit under 0.3: patients left with nothing keep their mask
    assert torch.equal(drop_modalities(mask, 0.0), mask)


def test_save_and_load_through_automodel_gives_identical_predictions(cohort, tmp_path):
    import histomim  # noqa: F401  (registers model_type "histofusion" with the Auto classes)

    config = make_config(
        ["genomic", "histology", "radiology"],
        fusion="coattention",
        head="discrete",
        num_bins=5,
        genomic_pathways={"first": list(range(30)), "second": list(range(30, 76))},
        histology_max_tiles=4,
    )
    torch.manual_seed(0)
    model = HistoFusionForSurvival(config).eval()
    rows = cohort["test"][:5]
    inputs = inputs_of(cohort, ["genomic", "histology", "radiology"], rows)
    with torch.no_grad():
        expected = model(**inputs)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "histofusion"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, HistoFusionForSurvival) and not loaded.training
    assert loaded.config.genomic_pathways == config.genomic_pathways
    with torch.no_grad():
        output = loaded(**inputs)
    for name in ("risk", "logits", "survival", "fused_embedding"):
        assert torch.equal(getattr(output, name), getattr(expected, name)), name


OUTPUTS = ("risk", "logits", "hazards", "survival", "fused_embedding", "modality_mask")


@pytest.fixture(scope="module")
def saved_fusion(cohort, tmp_path_factory):
    """A small saved three-modality co-attention model with a discrete head, plus inputs and reference outputs
    (one patient without a scan, so the modality mask matters)."""
    config = make_config(["genomic", "histology", "radiology"], fusion="coattention", head="discrete", num_bins=4)
    torch.manual_seed(0)
    model = HistoFusionForSurvival(config).eval()
    inputs = inputs_of(cohort, ["genomic", "histology", "radiology"], cohort["test"][:4])
    inputs["radiology"] = inputs["radiology"].clone()
    inputs["radiology"][1] = float("nan")
    with torch.no_grad():
        output = model(**inputs)
    folder = tmp_path_factory.mktemp("fusion") / "model"
    model.save_pretrained(folder)
    reference = folder.parent / "reference.safetensors"
    save_file({**inputs, **{name: getattr(output, name).contiguous() for name in OUTPUTS}}, str(reference))
    return folder, reference


def load_fusion_snippet(source: str, reference) -> str:
    """Load a saved fusion model with trust_remote_code and check its predictions bit for bit."""
    return f"""
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel
data = load_file({str(reference)!r})
assert type(AutoConfig.from_pretrained({source!r}, trust_remote_code=True)).__name__ == "HistoFusionConfig"
model = AutoModel.from_pretrained({source!r}, trust_remote_code=True)
assert type(model).__name__ == "HistoFusionForSurvival" and not model.training, type(model)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    output = model(genomic=data["genomic"], histology=data["histology"], radiology=data["radiology"])
for name in {OUTPUTS!r}:
    assert torch.equal(getattr(output, name), data[name]), name
assert output.modality_mask[1].tolist() == [True, True, False]
print("LOADED", type(model).__module__)
"""


def test_saved_model_loads_with_remote_code_without_histomim(saved_fusion, tmp_path):
    folder, reference = saved_fusion
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_fusion.py", "modeling_fusion.py", "fusion.py",
            "genomic.py", "mil.py", "radiology.py", "heads.py", "losses.py"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_fusion.HistoFusionConfig",
                        "AutoModel": "modeling_fusion.HistoFusionForSurvival"}
    out = run_without_histomim(load_fusion_snippet(str(folder), reference),
                               env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "LOADED transformers_modules" in out


def test_saved_model_loads_by_repo_id_from_offline_hub_cache_without_histomim(saved_fusion, tmp_path):
    folder, reference = saved_fusion
    make_hub_cache(folder, tmp_path / "hub", "org/histofusion-tiny")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = run_without_histomim(load_fusion_snippet("org/histofusion-tiny", reference), env=env)
    assert "LOADED transformers_modules" in out


def test_bad_inputs_raise_clear_errors(cohort):
    model = HistoFusionForSurvival(make_config(["genomic", "histology"])).eval()
    rows = cohort["test"][:4]
    genes, bags = cohort["genomic"][rows], cohort["histology"][rows]

    with pytest.raises(ValueError, match=r"got input for \['radiology'\].*\['genomic', 'histology'\]"):
        model(genomic=genes, radiology=cohort["radiology"][rows])
    with pytest.raises(ValueError, match=r"genomic must have shape \(B, 76\)"):
        model(genomic=genes[:, :70])
    with pytest.raises(ValueError, match=r"\(B, N, 9\) \(config.histology_feature_dim\)"):
        model(histology=bags[..., :8])
    with pytest.raises(ValueError, match="no modality passed"):
        model()
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model(genomic=genes, histology=bags[:3])

    missing_everything = genes.clone()
    missing_everything[2] = float("nan")
    empty_bags = torch.ones(4, TILES_PER_PATIENT, dtype=torch.bool)
    empty_bags[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have none of the modalities"):
        model(genomic=missing_everything, histology=bags, histology_mask=empty_bags)
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\] have none"):
        model(genomic=genes, histology=bags, modality_mask=torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"marks 'genomic' present for rows \[2\]"):
        model(genomic=missing_everything, histology=bags, modality_mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"modality_mask must have shape \(4, 2\)"):
        model(genomic=genes, modality_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs both `time` and `event`"):
        model(genomic=genes, time=cohort["time"][rows])

    discrete = HistoFusionForSurvival(make_config(["genomic"], head="discrete"))
    with pytest.raises(ValueError, match="needs both `bin_index` and `event`"):
        discrete(genomic=genes, event=cohort["event"][rows])
    radiology_model = HistoFusionForSurvival(make_config(["radiology"], radiology_spatial_dims=3, radiology_image_size=16))
    with pytest.raises(ValueError, match=r"radiology must have 5 dims \(config.radiology_spatial_dims=3\)"):
        radiology_model(radiology=cohort["radiology"][rows])


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="modalities must be distinct names"):
        HistoFusionConfig(modalities=["genomic", "pathology"], genomic_num_features=3)
    with pytest.raises(ValueError, match="fusion must be one of"):
        make_config(["genomic"], fusion="sum")
    with pytest.raises(ValueError, match="fusion='bilinear' needs at least two modalities"):
        make_config(["genomic"], fusion="bilinear")
    with pytest.raises(ValueError, match="lack 'genomic'"):
        make_config(["histology", "radiology"], fusion="coattention")
    with pytest.raises(ValueError, match="histology_feature_dim"):
        HistoFusionConfig(modalities=["histology"])
    with pytest.raises(ValueError, match="num_bins >= 2"):
        make_config(["genomic"], head="discrete", num_bins=1)
    with pytest.raises(ValueError, match=r"radiology_image_size \[64, 64\] needs 3 sizes"):
        make_config(["radiology"], radiology_spatial_dims=3, radiology_image_size=[64, 64])
    with pytest.raises(ValueError, match="at least two modalities"):
        BilinearFusion(1, 16)


def test_shipped_model_files_import_only_torch_transformers_and_the_standard_library(saved_fusion):
    """The files saved next to the weights are remote code: no numpy, file readers, peft or histomim in them,
    not even inside functions or try blocks (transformers' import scan skips those, users' environments don't)."""
    import ast
    import sys

    folder, _ = saved_fusion
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, (path.name, roots)
