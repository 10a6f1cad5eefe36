"""Feature extraction: tiles of the real sample slide -> one safetensors file per slide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from histomim import HistoMIMModel, image_processor_for
from histomim.data import read_tile, tile_slides
from histomim.features import extract_features, load_tile_features

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, sample_slide_path):
    out = tmp_path_factory.mktemp("tiles")
    tile_slides([sample_slide_path], out, mpp=1.0, tile_size=64, min_tissue=0.5)
    return out


def test_extract_features_writes_one_file_per_slide_matching_the_encoder(tiled, tmp_path):
    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config(pooling="cls+mean")).eval()
    encoder.save_pretrained(tmp_path / "model")
    outputs = extract_features(tmp_path / "model", tiled, tmp_path / "features", batch_size=16)
    manifest = pd.read_parquet(tiled / "manifest.parquet")
    assert set(outputs) == set(manifest.slide_id)
    features = load_tile_features(next(iter(outputs.values())))
    assert features.shape == (len(manifest), 128)  # cls+mean doubles the width

    # the third tile's feature equals the encoder on that tile, preprocessed the same way
    row = manifest.iloc[2]
    pixels = image_processor_for(encoder.config)(read_tile(row), return_tensors="pt")["pixel_values"][0]
    with torch.no_grad():
        expected = encoder(pixels[None]).pooler_output[0]
    torch.testing.assert_close(features[2], expected, atol=1e-5, rtol=1e-5)

    # rerunning skips finished slides
    mtime = outputs[row.slide_id].stat().st_mtime_ns
    extract_features(tmp_path / "model", tiled, tmp_path / "features")
    assert outputs[row.slide_id].stat().st_mtime_ns == mtime


def test_load_tile_features_formats_and_errors(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    save_file({"x": torch.from_numpy(array)}, str(tmp_path / "b.safetensors"))
    for name in ("a.npy", "b.safetensors"):
        assert torch.equal(load_tile_features(tmp_path / name), torch.from_numpy(array))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_tile_features(tmp_path / "missing.npy")
    save_file({"x": torch.zeros(2, 2), "y": torch.zeros(2, 2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="c.safetensors"):
        load_tile_features(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="histomim tile"):
        extract_features(HistoMIMModel(tiny_config()), tmp_path / "nothing", tmp_path / "f")


def test_a_non_finite_tile_or_an_unreadable_file_is_named(tmp_path):
    """One NaN tile would make its patient's attention pooling NaN: the file, tile and its coordinates are named."""
    features = torch.randn(6, 8)
    features[4, 2], features[5, 0] = float("nan"), float("inf")
    coords = torch.arange(12, dtype=torch.int64).reshape(6, 2) * 224
    save_file({"features": features, "coords": coords}, str(tmp_path / "slide.safetensors"))
    message = r"slide\.safetensors: tile 4 at level-0 \(x, y\) \(1792, 2016\) has non-finite .* \(and 1 more tile"
    with pytest.raises(ValueError, match=message):
        load_tile_features(tmp_path / "slide.safetensors")
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "slide.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"torn\.safetensors: cannot read tile features"):
        load_tile_features(tmp_path / "torn.safetensors")


def test_features_of_a_non_square_tile_match_the_model_card_snippet(tiled, tmp_path, monkeypatch):
    """extract_features and `AutoImageProcessor` + `AutoModel` (the model card) preprocess alike: a wide tile
    is resized whole, not centre-cropped by one route and squashed by the other."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from histomim.data import tiles

    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config(pooling="mean")).eval()
    encoder.save_pretrained(tmp_path / "model")
    image_processor_for(encoder.config).save_pretrained(tmp_path / "model")
    manifest = pd.read_parquet(tiled / "manifest.parquet").iloc[:3].reset_index(drop=True)
    read_square = tiles.read_tile

    def read_wide(row):  # 128 x 64 px of real tissue: the tile and its right-hand neighbour's pixels
        wide = Image.new("RGB", (128, 64))
        wide.paste(read_square(row), (0, 0))
        wide.paste(read_square({**row, "x": int(row["x"]) + 64}), (64, 0))
        return wide

    monkeypatch.setattr(tiles, "read_tile", read_wide)
    outputs = extract_features(tmp_path / "model", manifest, tmp_path / "features")
    features = load_tile_features(outputs[manifest.slide_id[0]])

    processor = AutoImageProcessor.from_pretrained(tmp_path / "model")
    model = AutoModel.from_pretrained(tmp_path / "model").eval()
    images = [read_wide(row) for _, row in manifest.iterrows()]
    with torch.no_grad():
        expected = model(**processor(images, return_tensors="pt")).pooler_output
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slide_id", ["../escaped", "/tmp/absolute", "a/b"])
def test_a_slide_id_that_is_a_path_is_refused_before_anything_is_written(tiled, tmp_path, slide_id):
    """A crafted manifest cannot make extraction write outside --out (or replace another model's files)."""
    HistoMIMModel(tiny_config()).save_pretrained(tmp_path / "model")
    manifest = pd.read_parquet(tiled / "manifest.parquet").head(4)
    manifest.loc[2:, "slide_id"] = slide_id  # one honest slide, then the crafted one
    out = tmp_path / "run" / "features"
    with pytest.raises(ValueError, match=r"slide_id .* is not a plain file name"):
        extract_features(tmp_path / "model", manifest, out)
    assert not any(out.iterdir()) and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["features"]
    assert not (tmp_path / "escaped.safetensors").exists()


# -- reruns: provenance ----------------------------------------------------------------------------


def save_encoder(folder, seed: int):
    torch.manual_seed(seed)
    HistoMIMModel(tiny_config()).save_pretrained(folder)
    return folder


def test_feature_files_record_their_provenance_and_stale_ones_are_refused(tiled, tmp_path):
    from histomim.features import read_feature_provenance

    first, second = save_encoder(tmp_path / "first", 0), save_encoder(tmp_path / "second", 1)
    manifest = pd.read_parquet(tiled / "manifest.parquet").head(12)
    out = tmp_path / "features"
    target = extract_features(first, manifest, out)["CMU-1-Small-Region"]
    record = read_feature_provenance(target)
    assert record["encoder"] == str(first.resolve()) and record["encoder_class"] == "HistoMIMModel"
    assert record["slide"]["path"] == str(manifest.path[0]) and record["slide"]["size"] == 1938955
    assert record["level0_size"] == [2220, 2967] and record["tile_size"] == [64] and record["tile_count"] == 12
    assert record["mpp"] == [pytest.approx(128 * 0.499 / 64)] and len(record["weights_sha256"]) == 64
    mtime = target.stat().st_mtime_ns
    assert extract_features(first, manifest, out) == {"CMU-1-Small-Region": target}  # the same run again: kept
    assert target.stat().st_mtime_ns == mtime

    for model, tiles, image_size, what in [
        (second, manifest, None, "encoder weights"),  # another model
        (first, manifest.head(8), None, "tile set"),  # other tiles (e.g. another tiling)
        (first, manifest, 32, "preprocessing"),  # another --image-size
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"{target}: .*{what}.*") as refused:
            extract_features(model, tiles, out, image_size=image_size)
        assert "--overwrite" in str(refused.value)
        assert target.stat().st_mtime_ns == mtime  # nothing replaced, nothing computed

    before = load_tile_features(target)
    (out / "broken.safetensors").write_bytes(target.read_bytes()[:100])  # a file cut short under a slide's name
    with pytest.raises(ValueError, match=r"broken.safetensors: unreadable"):
        extract_features(first, manifest.assign(slide_id="broken"), out)
    extract_features(second, manifest, out, overwrite=True)
    assert read_feature_provenance(target)["weights_sha256"] != record["weights_sha256"]
    assert not torch.allclose(load_tile_features(target), before)


def test_a_slide_id_from_two_slide_files_never_mixes_or_reuses_features(tiled, tmp_path):
    import shutil

    copy = tmp_path / "slides" / "CMU-1-Small-Region.svs"  # another file with the same id (another site's case1)
    copy.parent.mkdir()
    shutil.copy(pd.read_parquet(tiled / "manifest.parquet").path[0], copy)
    model = save_encoder(tmp_path / "model", 0)
    manifest = pd.read_parquet(tiled / "manifest.parquet").head(6)
    elsewhere = manifest.assign(path=str(copy))

    merged = pd.concat([manifest, elsewhere], ignore_index=True)
    with pytest.raises(ValueError, match="'CMU-1-Small-Region' has tiles from 2 slide files") as refused:
        extract_features(model, merged, tmp_path / "merged")
    assert str(copy) in str(refused.value) and manifest.path[0] in str(refused.value)
    assert not any((tmp_path / "merged").iterdir())

    out = tmp_path / "features"
    extract_features(model, manifest, out)
    with pytest.raises(ValueError, match=rf"slide file: {manifest.path[0]} .* -> {copy} "):
        extract_features(model, elsewhere, out)


def test_an_interrupted_extraction_keeps_every_finished_slide(tiled, tmp_path, monkeypatch):
    import shutil

    from histomim.data import tiles

    copy = tmp_path / "second.svs"
    shutil.copy(pd.read_parquet(tiled / "manifest.parquet").path[0], copy)
    first = pd.read_parquet(tiled / "manifest.parquet").head(6)
    manifest = pd.concat([first, first.assign(slide_id="second", path=str(copy))], ignore_index=True)
    model = save_encoder(tmp_path / "model", 0)
    out = tmp_path / "features"
    read_square = tiles.read_tile

    def dies_on_second_slide(row):
        if row["path"] == str(copy):
            raise RuntimeError("killed")  # the process ends here, as with kill -9 mid-run
        return read_square(row)

    monkeypatch.setattr(tiles, "read_tile", dies_on_second_slide)
    with pytest.raises(RuntimeError, match="killed"):
        extract_features(model, manifest, out)
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.safetensors"]  # no partial file
    finished = out / "CMU-1-Small-Region.safetensors"
    mtime = finished.stat().st_mtime_ns

    monkeypatch.undo()
    outputs = extract_features(model, manifest, out)
    assert finished.stat().st_mtime_ns == mtime  # kept, not recomputed
    assert load_tile_features(outputs["second"]).shape == (6, 64)
    torch.testing.assert_close(load_tile_features(outputs["second"]), load_tile_features(finished))  # same pixels


# -- several processes, slides tiled on the fly ----------------------------------------------------


def test_two_processes_split_the_slides_and_match_one_process(tiled, tmp_path):
    """`accelerate launch --num_processes 2 ... extract`: each slide is extracted by exactly one process, every
    file is written, and the features are those of a one-process run."""
    import os
    import subprocess
    import sys

    from histomim.features import read_feature_provenance

    # three slide ids of 6 real tiles each (one slide file): process 0 takes slides 0 and 2, process 1 slide 1
    manifest = pd.read_parquet(tiled / "manifest.parquet").head(18).reset_index(drop=True)
    manifest["slide_id"] = [f"case{i // 6}" for i in range(len(manifest))]
    manifest.to_parquet(tmp_path / "manifest.parquet")
    model = save_encoder(tmp_path / "model", 0)
    out = tmp_path / "features"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "histomim.cli",
               "extract", "--model", str(model), "--tiles", str(tmp_path / "manifest.parquet"), "--out", str(out),
               "--device", "cpu", "--batch-size", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count(f"features of 3 slides in {out}") == 1  # printed by the main process only

    written = {p.stem: read_feature_provenance(p) for p in out.glob("*.safetensors")}
    assert sorted(written) == ["case0", "case1", "case2"]
    assert {slide: record["process_index"] for slide, record in written.items()} == {"case0": 0, "case1": 1, "case2": 0}
    assert {record["num_processes"] for record in written.values()} == {2}

    single = extract_features(model, manifest, tmp_path / "single", batch_size=4, device="cpu")
    for slide_id, path in single.items():
        assert read_feature_provenance(path)["process_index"] == 0
        torch.testing.assert_close(load_tile_features(out / f"{slide_id}.safetensors"), load_tile_features(path),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # the split run's files are current for a one-process rerun: kept, not recomputed
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    extract_features(model, manifest, out, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert written["case1"]["tile_count"] == 6


def test_slides_are_tiled_on_the_fly_at_the_encoders_resolution(sample_slide_path, tmp_path):
    """`extract --slides` gives the features and coordinates of `histomim tile` at the encoder's target_mpp and
    image_size followed by `extract --tiles`, without writing tiles."""
    from histomim.cli.extract import main
    from histomim.features import read_feature_provenance

    torch.manual_seed(0)
    HistoMIMModel(tiny_config(image_size=32, patch_size=8, target_mpp=4.0)).save_pretrained(tmp_path / "model")
    assert main(["--model", str(tmp_path / "model"), "--slides", str(sample_slide_path), "--out",
                 str(tmp_path / "on_the_fly"), "--device", "cpu"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "on_the_fly"]  # no tile folder
    on_the_fly = tmp_path / "on_the_fly" / "CMU-1-Small-Region.safetensors"

    tile_slides([sample_slide_path], tmp_path / "tiles", mpp=4.0, tile_size=32)
    tiled_first = extract_features(tmp_path / "model", tmp_path / "tiles", tmp_path / "tiled", device="cpu")
    expected = tiled_first["CMU-1-Small-Region"]
    from safetensors.torch import load_file

    got, want = load_file(on_the_fly), load_file(expected)
    assert len(want["coords"]) > 20 and torch.equal(got["coords"], want["coords"])
    torch.testing.assert_close(got["features"], want["features"], atol=1e-5, rtol=1e-5)
    record = read_feature_provenance(on_the_fly)
    assert record["mpp"] == [pytest.approx(4.0, rel=0.01)] and record["tile_size"] == [32]
    assert record["tiles_sha256"] == read_feature_provenance(expected)["tiles_sha256"]

    # --mpp overrides the encoder's resolution: other tiles, so the existing file is refused as stale
    with pytest.raises(ValueError, match=r"CMU-1-Small-Region.safetensors: .*tile set"):
        main(["--model", str(tmp_path / "model"), "--slides", str(sample_slide_path.parent), "--mpp", "8",
              "--out", str(tmp_path / "on_the_fly"), "--device", "cpu"])  # fmt: skip


def test_a_folder_of_tile_images_gives_one_feature_file_per_subfolder(tiled, tmp_path):
    """Tile images saved as PNG (lossless) give the features of the same tiles read from the slide; each
    subfolder is a slide, the provenance names each row's image, and a changed image makes the file stale."""
    from safetensors.torch import load_file

    from histomim.data import read_tile
    from histomim.features import read_feature_provenance

    manifest = pd.read_parquet(tiled / "manifest.parquet").head(7).reset_index(drop=True)
    manifest["slide_id"] = ["caseA"] * 4 + ["caseB"] * 3
    images = tmp_path / "images"
    for index, row in manifest.iterrows():
        (images / row.slide_id).mkdir(parents=True, exist_ok=True)
        read_tile(row).save(images / row.slide_id / f"tile_{index:02d}.png")
    model = save_encoder(tmp_path / "model", 0)
    outputs = extract_features(model, images, tmp_path / "features", device="cpu")
    from_slide = extract_features(model, manifest, tmp_path / "from_slide", device="cpu")
    assert sorted(outputs) == ["caseA", "caseB"]
    for slide_id, path in outputs.items():
        assert list(load_file(path)) == ["features"]  # no coordinates for loose images
        torch.testing.assert_close(load_tile_features(path), load_tile_features(from_slide[slide_id]), atol=1e-5, rtol=1e-5)
    record = read_feature_provenance(outputs["caseB"])
    assert record["tile_names"] == ["tile_04.png", "tile_05.png", "tile_06.png"] and record["tile_count"] == 3
    assert record["slide"]["path"] == str((images / "caseB").resolve())

    mtime = outputs["caseA"].stat().st_mtime_ns
    assert extract_features(model, images, tmp_path / "features", device="cpu") == outputs  # the same: kept
    assert outputs["caseA"].stat().st_mtime_ns == mtime
    read_tile(manifest.iloc[6]).rotate(90).save(images / "caseB" / "tile_06.png")  # another image under the name
    with pytest.raises(ValueError, match=r"caseB.safetensors: .*tile set"):
        extract_features(model, images, tmp_path / "features", device="cpu")
    read_tile(manifest.iloc[0]).save(images / "stray.png")
    with pytest.raises(ValueError, match=r"images: 1 images \(e.g. stray.png\) lie beside the slide subfolders caseA"):
        extract_features(model, images, tmp_path / "features", device="cpu")


def test_tile_settings_with_a_manifest_are_refused_by_name(tmp_path, capsys):
    from histomim.cli.extract import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--tiles", str(tmp_path), "--out", str(tmp_path / "f"), "--mpp", "1"])
    assert "--mpp and --tile-size apply to --slides" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source only
        parse_args(["--model", "m", "--tiles", str(tmp_path), "--slides", "a.svs", "--out", str(tmp_path / "f")])
    assert "not allowed with argument" in capsys.readouterr().err
