"""`pipeline("image-feature-extraction", model=<saved histomim folder>)`: the image processor saved next to the
model preprocesses, and the pipeline gives the encoder's own tokens and pooled output, histomim installed or not."""

from __future__ import annotations

import numpy as np
import torch
from conftest import save_tiny_encoder
from PIL import Image

from histomim import HistoMIMModel, image_processor_for
from histomim.data.samples import sample_ihc_path


def test_image_feature_extraction_pipeline_matches_the_encoder(tmp_path):
    from transformers import pipeline

    folder = save_tiny_encoder(tmp_path / "encoder", seed=3)
    image = Image.open(sample_ihc_path()).convert("RGB").crop((0, 0, 96, 96))
    extractor = pipeline("image-feature-extraction", model=str(folder), device="cpu")
    assert isinstance(extractor.model, HistoMIMModel)

    encoder = HistoMIMModel.from_pretrained(folder).eval()
    pixels = image_processor_for(encoder.config)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = encoder(pixels)
    tokens = extractor(image, return_tensors=True)  # (1, 1 + L, D)
    torch.testing.assert_close(tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    pooled = np.asarray(extractor(image, pool=True))  # (1, D)
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=1e-5)
    batch = extractor([image, image.rotate(90)], pool=True)
    assert len(batch) == 2 and not np.allclose(batch[0], batch[1])


def test_pipeline_with_remote_code_where_histomim_is_not_installed(tmp_path):
    from test_loading import run_without_histomim

    folder = save_tiny_encoder(tmp_path / "encoder", seed=3)
    encoder = HistoMIMModel.from_pretrained(folder).eval()
    image_path = tmp_path / "tile.png"
    Image.open(sample_ihc_path()).convert("RGB").crop((0, 0, 32, 32)).save(image_path)
    pixels = image_processor_for(encoder.config)(Image.open(image_path), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = encoder(pixels).pooler_output[0].tolist()
    out = run_without_histomim(f"""
        from transformers import pipeline
        extractor = pipeline("image-feature-extraction", model={str(folder)!r}, trust_remote_code=True, device="cpu")
        pooled = torch.tensor(extractor({str(image_path)!r}, pool=True))[0]
        assert torch.allclose(pooled, torch.tensor({expected!r}), atol=1e-5), pooled
        print("PIPELINE", type(extractor.model).__module__)
    """, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert "PIPELINE transformers_modules" in out
