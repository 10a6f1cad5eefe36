#!/usr/bin/env bash
# What a user who runs `pip install histomim` gets: build the wheel, install it into fresh venvs outside the
# repository, load an encoder with only the core dependencies, then run the demo with the pretrain extra.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/histomim-wheel-XXXXXX)"
trap 'rm -rf "$work"' EXIT
pip_quiet=(--quiet --disable-pip-version-check)

python -m pip wheel "${pip_quiet[@]}" --no-deps --wheel-dir "$work/dist" "$repo"
wheel="$(ls "$work"/dist/histomim-*.whl)"
unzip -l "$wheel" | grep -q "histomim/hub_configs/histomim-vitb16/config.json"
unzip -l "$wheel" | grep -q "histomim/model_cards/histomim_pretrained.md"

python -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install "${pip_quiet[@]}" torch==2.13.0   # the CPU build first, as in the README
"$venv_python" -m pip install "${pip_quiet[@]}" "$wheel"         # the core only
cd "$work"

# 1. core: import, presets, an encoder saved and loaded through AutoModel; no training or survival stack
"$venv_python" - <<'PY'
import importlib.util, tempfile, torch
for heavy in ("accelerate", "datasets", "sksurv", "pandas", "peft", "matplotlib", "tiffslide"):
    assert importlib.util.find_spec(heavy) is None, f"{heavy} is installed with the core"
import histomim
from histomim.presets import preset_names
from transformers import AutoConfig, AutoModel
assert "histomim-vitb16" in preset_names(), preset_names()
from histomim.presets import config_source
config = AutoConfig.from_pretrained(config_source("histomim-vit-tiny16"), image_size=32)
model = AutoModel.from_config(config).eval()
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = AutoModel.from_pretrained(folder).eval()
pixels = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    assert torch.equal(model(pixels).pooler_output, loaded(pixels).pooler_output)
print("core install: import, presets and AutoModel round trip OK")
PY

# 2. the pretrain extra: the CLI and the demo, from a folder outside the repository
"$venv_python" -m pip install "${pip_quiet[@]}" "${wheel}[pretrain]"
"$work/venv/bin/histomim" --help | grep -q "pretrain"
"$work/venv/bin/histomim" pretrain --demo --max-steps 3 --image-size 64 --batch-size 8 --output-dir "$work/demo" \
    | tee "$work/demo.log" | tail -3
head -1 "$work/demo.log" | grep -q "^demo: "
test -s "$work/demo/README.md" && test -s "$work/demo/model.safetensors" && test -s "$work/demo/reconstruction.png"
grep -q "histopathology" "$work/demo/README.md"

# 3. `pip install .` (not editable) gives the same package data
"$venv_python" -m pip install "${pip_quiet[@]}" --no-deps --force-reinstall "$repo"
"$venv_python" -c "from histomim.presets import preset_names, presets_dir; from histomim.hub import model_cards_dir
assert 'histomim-vit-tiny16' in preset_names() and 'site-packages' in str(presets_dir()), presets_dir()
assert (model_cards_dir() / 'histomim_pretrained.md').is_file()"
echo "wheel check: OK"
