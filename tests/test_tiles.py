"""load_tile_dataset on every source kind, built from real tiles of the CMU-1 sample slide."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from histomim.data.samples import sample_ihc_path, sample_slide_path
from histomim.data.slides import open_slide
from histomim.data.tiles import (
    StreamingTileDataset, TileDataset, TileReadError, TileReadWarning, load_tile_dataset, read_tile,
)  # fmt: skip
from histomim.data.tiling import tile_slides
from histomim.data.transforms import pretrain_transform

KEYS = ("slide_id", "x", "y")
MEAN, STD = (0.7, 0.55, 0.7), (0.15, 0.2, 0.15)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    """tile_slides output for the sample SVS at 1 um/px, 112 px tiles, with tile images saved."""
    out = tmp_path_factory.mktemp("tiled")
    report = tile_slides([sample_slide_path()], out, mpp=1.0, tile_size=112, min_tissue=0.5, save_images=True)
    assert len(report.manifest) > 30 and not report.errors
    return out


@pytest.fixture(autouse=True)
def hf_cache_in_tmp(tmp_path, monkeypatch):
    """Keep datasets' arrow cache out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def tile_keys(dataset) -> list[tuple]:
    return [(item["slide_id"], int(item["x"]), int(item["y"])) for item in dataset]


def test_read_tile_reads_the_manifest_region(tiled):
    row = pd.read_parquet(tiled / "manifest.parquet").iloc[4]
    tile = read_tile(row.to_dict())
    assert tile.size == (112, 112) and tile.mode == "RGB"
    with open_slide(row.path) as slide:
        expected = slide.read_tile((row.x, row.y), row.level, row.read_size, row.tile_size)
    np.testing.assert_array_equal(np.asarray(tile), np.asarray(expected))
    with pytest.raises(KeyError, match="read_size"):
        read_tile({"path": row.path, "x": 0, "y": 0, "level": 0, "tile_size": 112})


@pytest.mark.parametrize("source", ["out_dir", "manifest_file", "per_slide_manifests", "dataframe"])
def test_manifest_sources(tiled, source):
    manifest = pd.read_parquet(tiled / "manifest.parquet")
    given = {
        "out_dir": tiled,
        "manifest_file": tiled / "manifest.parquet",
        "per_slide_manifests": tiled / "manifests",
        "dataframe": manifest,
    }[source]
    dataset = load_tile_dataset(given, keep_columns=KEYS)
    assert isinstance(dataset, TileDataset) and len(dataset) == len(manifest)
    item = dataset[3]
    assert item["pixel_values"].shape == (3, 112, 112) and item["pixel_values"].dtype == torch.float32
    assert 0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert (item["slide_id"], item["x"], item["y"]) == tuple(manifest.loc[3, list(KEYS)])


def test_saved_tile_images_equal_tiles_read_from_the_slide(tiled):
    from_slides = load_tile_dataset(tiled, keep_columns=KEYS)
    saved = load_tile_dataset(tiled / "tiles", keep_columns=KEYS)  # folder of save_to_disk datasets
    single = load_tile_dataset(tiled / "tiles" / "CMU-1-Small-Region")  # one save_to_disk dataset
    assert len(saved) == len(single) == len(from_slides)
    for index in (0, len(saved) // 2, len(saved) - 1):
        a, b = saved[index], from_slides[index]
        assert (a["slide_id"], a["x"], a["y"]) == (b["slide_id"], b["x"], b["y"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])  # PNG is lossless
        torch.testing.assert_close(single[index]["pixel_values"], b["pixel_values"])


def write_image_folder(folder: Path) -> list[Path]:
    """Six 96 px crops of the IHC image in nested folders, plus a non-image file."""
    ihc = Image.open(sample_ihc_path()).convert("RGB")
    paths = []
    for i in range(6):
        path = folder / f"class_{i % 2}" / ("deep" if i > 3 else "") / f"crop_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        ihc.crop((60 * i, 40 * i, 60 * i + 96, 40 * i + 96)).save(path)
        paths.append(path)
    (folder / "README.txt").write_text("not an image")
    return paths


def test_image_folder_is_searched_recursively(tmp_path):
    paths = write_image_folder(tmp_path / "images")
    dataset = load_tile_dataset(tmp_path / "images", transform=pretrain_transform(64, MEAN, STD, seed=0))
    assert len(dataset) == len(paths)
    batch = next(iter(DataLoader(dataset, batch_size=6)))
    assert batch["pixel_values"].shape == (6, 3, 64, 64)


def test_parquet_with_image_column_and_hub_layout(tmp_path):
    import datasets

    paths = write_image_folder(tmp_path / "images")
    images = datasets.Dataset.from_dict({"img": [str(p) for p in paths], "label": list(range(6))})
    images = images.cast_column("img", datasets.Image())
    images.to_parquet(tmp_path / "tiles.parquet")  # embeds the image bytes
    from_file = load_tile_dataset(tmp_path / "tiles.parquet", keep_columns=("label",))
    assert len(from_file) == 6 and from_file[2]["pixel_values"].shape == (3, 96, 96)
    assert from_file[2]["label"] == 2
    expected = torch.from_numpy(np.array(Image.open(paths[2]).convert("RGB"))).permute(2, 0, 1) / 255
    torch.testing.assert_close(from_file[2]["pixel_values"], expected)

    # a dataset repository as on the Hub (data/train-*.parquet) goes through datasets.load_dataset
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    images.to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    from_repo = load_tile_dataset(str(repo), split="train")
    assert len(from_repo) == 6
    torch.testing.assert_close(from_repo[2]["pixel_values"], expected)
    streamed = load_tile_dataset(str(repo), streaming=True)
    assert isinstance(streamed, StreamingTileDataset)
    assert len([item["pixel_values"].shape for item in streamed]) == 6


def test_bad_sources_name_the_culprit(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images.*empty"):
        load_tile_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_tile_dataset(tmp_path / "does_not_exist")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="notes.csv"):
        load_tile_dataset(tmp_path / "notes.csv")
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "table.parquet")
    with pytest.raises(ValueError, match=r"table.parquet.*no Image column.*\['a'\]"):
        load_tile_dataset(tmp_path / "table.parquet")
    with pytest.raises(ValueError, match="lacks column.*read_size"):
        load_tile_dataset(pd.DataFrame({"path": ["x.svs"], "x": [0], "y": [0], "level": [0], "tile_size": [8]}))


def test_unknown_hub_id_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="histomim-no-such-org/no-such-tiles"):
        load_tile_dataset("histomim-no-such-org/no-such-tiles")


def test_keep_columns_must_exist(tiled):
    with pytest.raises(ValueError, match="keep_columns.*'label'"):
        load_tile_dataset(tiled, keep_columns=("label",))


def test_manifest_dataset_with_dataloader_workers(tiled):
    dataset = load_tile_dataset(tiled, keep_columns=KEYS)
    restored = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(restored[1]["pixel_values"], dataset[1]["pixel_values"])
    loader = DataLoader(dataset, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(len(b["pixel_values"]) for b in batches) == len(dataset)
    assert all(b["pixel_values"].shape[1:] == (3, 112, 112) for b in batches)
    stacked = torch.cat([b["pixel_values"] for b in batches])
    torch.testing.assert_close(stacked, torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))]))


def test_seeded_augmentation_is_per_index_and_epoch_even_in_persistent_workers(tiled):
    dataset = load_tile_dataset(tiled, transform=pretrain_transform(48, MEAN, STD, seed=1))
    epoch0 = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    dataset.set_epoch(1)
    epoch1 = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    assert not torch.equal(epoch0, epoch1)

    loader = DataLoader(dataset, batch_size=16, num_workers=2, persistent_workers=True)
    dataset.set_epoch(0)
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in loader]), epoch0)
    dataset.set_epoch(1)  # reaches the already running workers through shared memory
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in loader]), epoch1)


def test_streaming_yields_the_same_tiles(tiled):
    expected = sorted(tile_keys(load_tile_dataset(tiled, keep_columns=KEYS)))
    streamed = load_tile_dataset(tiled, streaming=True, keep_columns=KEYS, world_size=1)
    assert isinstance(streamed, torch.utils.data.IterableDataset)
    loader = DataLoader(streamed, batch_size=8, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, 112, 112)
        seen += list(zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist()))
    assert sorted(seen) == expected  # every tile exactly once across workers

    # two ranks: disjoint halves that together make the whole
    ranks = [
        tile_keys(load_tile_dataset(tiled, streaming=True, keep_columns=KEYS, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == expected
    with pytest.raises(ValueError, match="rank"):
        load_tile_dataset(tiled, streaming=True, rank=2, world_size=2)

    shuffled = streamed.shuffle(seed=0, buffer_size=16)
    order = tile_keys(shuffled)
    assert sorted(order) == expected and order != tile_keys(streamed)


# -- unreadable tiles ------------------------------------------------------------------------------


def truncate(path: Path) -> Path:
    """Keep the first half of a file, as a copy cut short by a full disk or a killed transfer."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def tile_images_with_two_truncated(tmp_path) -> tuple[Path, list[Path]]:
    """Eight 64 px tiles of real tissue as JPEG and PNG files; one of each cut short."""
    folder = tmp_path / "tile_images"
    folder.mkdir()
    with open_slide(sample_slide_path()) as slide:
        for i in range(8):
            tile = slide.read_tile((600 + 128 * i, 1800), 0, 128, 64)
            tile.save(folder / f"tile{i}.{'jpg' if i % 2 else 'png'}")
    return folder, [truncate(folder / "tile3.jpg"), truncate(folder / "tile6.png")]


def test_a_truncated_tile_image_is_named_and_skipped_with_a_count(tile_images_with_two_truncated):
    folder, truncated = tile_images_with_two_truncated
    strict = load_tile_dataset(folder)
    with pytest.raises(TileReadError, match="tile3.jpg: OSError"):
        [strict[i] for i in range(len(strict))]

    dataset = load_tile_dataset(folder, skip_unreadable=True)
    with pytest.warns(TileReadWarning) as warned:
        batches = list(DataLoader(dataset, batch_size=4))
    assert [len(batch["pixel_values"]) for batch in batches] == [4, 4]  # whole batches: replaced, not dropped
    named = " ".join(str(w.message) for w in warned)
    assert all(str(path) in named for path in truncated)
    assert dataset.skipped_unreadable == 2
    # the replacement is the next readable tile, so every run (and an exact resume) sees the same data
    torch.testing.assert_close(dataset[3]["pixel_values"], dataset[4]["pixel_values"])

    streamed = load_tile_dataset(folder, streaming=True, skip_unreadable=True)
    with pytest.warns(TileReadWarning):
        assert len(list(streamed)) == 6 and streamed.skipped_unreadable == 2


def test_a_corrupt_slide_in_a_manifest_is_named_with_the_tile_coordinates(tiled, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(sample_slide_path().read_bytes())
    truncate(broken)  # a slide cut short in a copy
    manifest = pd.read_parquet(tiled / "manifest.parquet").head(6)
    manifest.loc[1, "path"] = str(broken)
    row = manifest.loc[1]
    strict = load_tile_dataset(manifest)
    with pytest.raises(TileReadError, match=rf"broken.svs: tile at level-0 \(x, y\) = \({row.x}, {row.y}\)"):
        strict[1]
    skipping = load_tile_dataset(manifest, skip_unreadable=True)
    with pytest.warns(TileReadWarning, match="broken.svs"):
        assert len([skipping[i] for i in range(6)]) == 6
    assert skipping.skipped_unreadable == 1
