"""Publishing: the model card, and the exact folder `--push-to-hub` uploads, loaded the three ways users load it.

The Hub cannot be reached here, so `HfApi.create_repo` / `HfApi.upload_folder` are replaced by fakes
that record their arguments and keep a copy of the uploaded folder; everything up to that call is real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import HfApi
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining

from histomim import HistoMIMForPreTraining, HistoMIMModel
from histomim.hub import check_model_card, files_to_upload, push_to_hub, render_model_card
from histomim.run_report import card_info
from histomim.training.pretrain import PretrainArguments, pretrain

from conftest import tiny_config
from test_loading import load_encoder_snippet, make_hub_cache, run_without_histomim

REPO_ID = "histomim-org/tiny-demo"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A short real run with --push-to-hub, against a fake Hub that keeps what it was sent."""
    root = tmp_path_factory.mktemp("publish")
    tiny_config().save_pretrained(root / "config")
    calls, uploaded = [], root / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, uploaded)  # the staging folder is deleted after the upload
        return f"https://huggingface.co/{repo_id}/commit/0123456"

    output_dir = root / "tiny-demo"
    output_dir.mkdir()  # strays a user may leave beside the model: never published
    (output_dir / "token.txt").write_text("hf_0123456789abcdefSECRET\n")
    (output_dir / "notes.json").write_text('{"patient": "S-12-34567"}\n')
    args = PretrainArguments(
        config=str(root / "config"), output_dir=str(output_dir), image_size=64, mpp=1.0, batch_size=32, max_steps=3,
        base_lr=0.02, warmup_steps=1, checkpointing_steps=2, push_to_hub=True, hub_model_id=REPO_ID, demo=True,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        result = pretrain(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    # reference encoder outputs of the trained model, for the loading routes
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = result.model.eval().histomim(pixels).last_hidden_state
    save_file({"pixels": pixels, "reference": reference}, str(root / "reference.safetensors"))
    return result, calls, uploaded, root / "reference.safetensors"


def test_push_creates_the_repo_then_uploads_only_the_model_files(published):
    result, calls, uploaded, _ = published
    assert [call[:2] for call in calls] == [("create_repo", REPO_ID), ("upload_folder", REPO_ID)]
    assert calls[0][2]["exist_ok"] is True and calls[0][2]["private"] is True  # private unless --public
    names = {p.name for p in uploaded.iterdir()}
    assert names == {p.name for p in files_to_upload(result.output_dir)}
    assert "token.txt" not in names and "notes.json" not in names
    assert (result.output_dir / "token.txt").is_file()  # left alone locally
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_histomim.py",
            "modeling_histomim.py", "masking.py", "reconstruction.png", "loss_curve.png"} <= names  # fmt: skip
    assert all(p.is_file() for p in uploaded.iterdir())  # no checkpoints/, tiles/, logs/
    assert (result.output_dir / "checkpoints" / "latest").is_file()


def test_uploaded_folder_loads_with_histomim_installed(published):
    result, _, uploaded, reference_file = published
    encoder = AutoModel.from_pretrained(uploaded).eval()
    assert type(encoder) is HistoMIMModel
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(pixels).last_hidden_state, result.model.histomim(pixels).last_hidden_state, rtol=0, atol=0
        )
    pretraining = AutoModelForPreTraining.from_pretrained(uploaded)
    assert type(pretraining) is HistoMIMForPreTraining
    torch.testing.assert_close(pretraining.decoder.pred.weight, result.model.decoder.pred.weight, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(uploaded)
    assert processor.size == {"height": 64, "width": 64}


def test_uploaded_folder_loads_with_trust_remote_code_without_histomim(published, tmp_path):
    _, _, uploaded, reference_file = published
    out = run_without_histomim(load_encoder_snippet(str(uploaded), reference_file), env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "LOADED transformers_modules" in out


def test_uploaded_folder_resolves_by_repo_id_from_an_offline_hub_cache(published, tmp_path):
    _, _, uploaded, reference_file = published
    cache = tmp_path / "hub"
    make_hub_cache(uploaded, cache, REPO_ID)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = textwrap.dedent(
        f"""
        import torch, histomim
        from safetensors.torch import load_file
        from transformers import AutoModel
        data = load_file({str(reference_file)!r})
        model = AutoModel.from_pretrained({REPO_ID!r}).eval()
        assert type(model) is histomim.HistoMIMModel
        with torch.no_grad():
            assert torch.equal(model(data["pixels"]).last_hidden_state, data["reference"])
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    assert "LOADED transformers_modules" in run_without_histomim(load_encoder_snippet(REPO_ID, reference_file), env=env)


def test_uploaded_model_card_describes_the_run(published):
    result, _, uploaded, _ = published
    card = check_model_card((uploaded / "README.md").read_text())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert {"histopathology", "masked-image-modeling", "mae"} <= set(data["tags"]) and data["license"] == "apache-2.0"
    assert {"histology", "hematoxylin-and-eosin"} <= set(data["tags"]) and "he" not in data["tags"]
    text = card.text
    for expected in (f'AutoModel.from_pretrained("{REPO_ID}")', "trust_remote_code=True", f"# {REPO_ID}",
                     "Slides: 1", "145 tiles of 64 px at 1 um/px", "mask ratio 0.75", "| Steps | 3 (", "Intended use",
                     "Limitations", f"{result.summary['last_loss']:.4f}", "1 process on CPU", "](reconstruction.png)",
                     "@misc{histomim"):  # fmt: skip
        assert expected in text, expected
    assert "CMU-1-Small-Region" not in text  # counts, not slide names (often accession numbers), by default


def test_published_summary_has_no_absolute_path_and_no_slide_name(published):
    result, _, uploaded, _ = published
    text = (uploaded / "pretrain_summary.json").read_text()
    local = (result.output_dir / "pretrain_summary.json").read_text()
    assert str(result.output_dir) in local and "CMU-1-Small-Region" in local  # the local record is complete
    published_summary = json.loads(text)
    assert str(result.output_dir.parent) not in text and "/tmp" not in text and "/root" not in text
    assert "CMU-1-Small-Region" not in text
    assert published_summary["data"]["slides"] == 1 and published_summary["steps"] == 3


def test_card_metadata_for_other_licenses_datasets_base_model_and_gating(published):
    result, *_ = published
    info = card_info({**result.summary, "losses": result.losses})
    info.update(license="other", license_name="cc-by-nc-4.0-pathology", license_link="LICENSE",
                datasets=["org/tcga-tiles"], base_model="org/histomim-vitb", gated_prompt="Research use only.",
                gated_fields=["Affiliation"])  # fmt: skip
    data = render_model_card(info).data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "cc-by-nc-4.0-pathology"
    assert data["license_link"] == "LICENSE" and data["datasets"] == ["org/tcga-tiles"]
    assert data["base_model"] == "org/histomim-vitb" and data["extra_gated_prompt"] == "Research use only."
    assert data["extra_gated_fields"] == {"Affiliation": "text"}
    with pytest.raises(ValueError, match="license_name"):
        render_model_card({**info, "license_link": None})


def test_card_lists_slides_only_when_asked(published):
    result, *_ = published
    summary = {**result.summary, "losses": result.losses, "args": {**result.summary["args"], "card_list_slides": True}}
    assert "CMU-1-Small-Region" in render_model_card(card_info(summary)).text


def test_public_flag_creates_a_public_repo(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: "https://huggingface.co/x/commit/1")
    folder = tmp_path / "model"
    tiny_config().save_pretrained(folder)
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    push_to_hub(folder, REPO_ID)
    push_to_hub(folder, REPO_ID, private=not PretrainArguments(public=True).public)
    assert [call["private"] for call in calls] == [True, False]


def test_check_model_card_rejects_broken_cards(published):
    result, *_ = published
    info = card_info({**result.summary, "losses": result.losses})
    good = str(render_model_card(info))
    with pytest.raises(ValueError, match="pipeline_tag"):
        check_model_card(good.replace("pipeline_tag: image-feature-extraction", "pipeline_tag: image-classification"))
    with pytest.raises(ValueError, match="unrendered"):
        check_model_card(good + "\n{{ forgotten }}\n")
    with pytest.raises(ValueError, match="library_name.*license|license"):
        check_model_card(good.replace("library_name: transformers\n", "").replace("license: apache-2.0\n", ""))
    with pytest.raises(FileNotFoundError, match="no-such-template.md"):
        render_model_card(info, template_path=Path("/nowhere/no-such-template.md"))


def test_files_to_upload_refuses_a_folder_without_a_model(tmp_path):
    (tmp_path / "notes.md").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        files_to_upload(tmp_path)
