"""Memory stays bounded whatever the slide size: a 432 MiB (decoded) single-level TIFF in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SIDE = 12288  # 12288^2 RGB = 432 MiB decoded, no pyramid: the thumbnail is streamed from level 0
TISSUE = (2048, 4096)  # a tissue square [2048, 4096)^2 in level-0 pixels

SCRIPT = r"""
import json, resource, sys
import numpy as np, tifffile
from breastcnn.models import load_model
from breastcnn.wsi.analysis import SlideSettings, analyse_slide
from breastcnn.wsi.magnification import Resolution

side, lo, hi, model_path, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tile = 512
glass = np.full((tile, tile, 3), 250, np.uint8)
tissue = np.full((tile, tile, 3), (200, 110, 175), np.uint8)
def tiles(n):
    for ty in range(0, n, tile):
        for tx in range(0, n, tile):
            yield tissue if (lo <= tx < hi and lo <= ty < hi) else glass
for name, n in (("small", 2048), ("big", side)):  # the streamed writer never holds the image either
    tifffile.imwrite(f"{folder}/{name}.tif", tiles(n), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
model = load_model(model_path)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
out = {}
for name in ("small", "big"):  # the small slide first: imports, matplotlib and the model are warm
    summary = analyse_slide(f"{folder}/{name}.tif", model, f"{folder}/out-{name}", SlideSettings(),
                            Resolution(0.5, "test"))
    out[name] = {"rss": rss(), "tiles": summary["tiles"], "tissue_tiles": summary["tissue_tiles"]}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and meaning are Linux's here")
def test_peak_memory_does_not_grow_with_the_slide(tmp_path, tile_model, slide_deps):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SIDE), *map(str, TISSUE), str(tile_model), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    decoded = SIDE * SIDE * 3
    growth = result["big"]["rss"] - result["small"]["rss"]
    # 0.5 um/px = the model's: 224-px tiles, (12288 - 224) // 224 + 1 = 54 per side; 9 per side at least half tissue
    assert result["big"]["tiles"] == 54 * 54 and result["big"]["tissue_tiles"] == 81
    print(f"peak RSS growth {growth / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB slide")
    assert growth < decoded / 4, f"peak RSS grew {growth / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB slide"
