"""The shipped lung U-Net (src/gren/lungs/weights/lungs-unet.pt) and ``--lungs auto`` / ``unet``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gren.core.errors import GrenError
from gren.data import cache_format as fmt
from gren.data.cache import PreparedCache
from gren.data.prepare import LungsSpec, prepare_cache
from gren.data.synth import synthesize
from gren.lungs.classical import ClassicalSegmenter
from gren.lungs.dice import lung_dice
from gren.lungs.folder import find_samples, load_pairs
from gren.lungs.segment import SHIPPED_WEIGHTS, load_segmenter, shipped_sha256
from gren.lungs.tools import pick_evenly
from gren.lungs.unet import CHECKPOINT_KIND, UNetSegmenter


def test_shipped_weights_load_with_weights_only_and_are_small():
    assert SHIPPED_WEIGHTS.is_file(), "the shipped lung U-Net is missing (benchmarks/train_shipped_lungs.py)"
    assert SHIPPED_WEIGHTS.stat().st_size < 3_000_000
    payload = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    assert payload["config"]["kind"] == CHECKPOINT_KIND
    assert payload["config"]["made_by"] == "benchmarks/train_shipped_lungs.py"
    assert {v.dtype for v in payload["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    segmenter = load_segmenter("unet")
    assert isinstance(segmenter, UNetSegmenter)
    assert all(p.dtype == torch.float32 for p in segmenter.model.parameters())


@pytest.mark.parametrize("n_films", [12])
def test_shipped_unet_beats_classical_on_the_real_films(lungs_dir, n_films):
    """Dice of both segmenters on the same real films (evenly spread over the 90). The shipped model was
    trained on all 90, so this is in-sample for it: a check that it works as shipped, not its accuracy
    on new films (that is the cross-validated figure in benchmarks/results/shipped_lungs.md)."""
    samples = pick_evenly(find_samples(lungs_dir, require_masks=True), n_films)
    images, masks = load_pairs(samples)
    batch, truth = np.stack(images), np.stack(masks)
    unet_masks, _ = load_segmenter("unet").segment(batch)
    classical_masks, _ = ClassicalSegmenter().segment(batch)
    unet = lung_dice(unet_masks, truth).mean()
    classical = lung_dice(classical_masks, truth).mean()
    assert unet > classical, (unet, classical)
    assert unet > 0.9


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, 4, size=64, seed=3, progress=False)
    return root


def test_auto_uses_dataset_masks_when_present_and_the_shipped_unet_otherwise(synth_dir, tmp_path):
    with_masks = prepare_cache(synth_dir, tmp_path / "a", size=64, lungs="auto", workers=1, progress=False)
    assert with_masks["mask_sources"] == {"dataset": 4}
    bare = tmp_path / "bare"
    shutil.copytree(synth_dir, bare)
    shutil.rmtree(bare / "masks")
    without = prepare_cache(bare, tmp_path / "b", size=64, lungs="auto", workers=1, progress=False)
    assert without["mask_sources"] == {"unet": 4}
    cache = PreparedCache(tmp_path / "b")
    assert cache.lungs == f"auto+unet@{shipped_sha256()[:16]}"
    assert set(np.unique(np.asarray(cache.lung_masks))) <= {0, 1, 2}


def test_lungs_spec_records_the_resolved_segmenter():
    digest = shipped_sha256()[:16]
    auto = LungsSpec.parse("auto")
    assert (auto.spec, auto.use_dataset_masks, auto.segmenter) == (f"auto+unet@{digest}", True, "unet")
    assert auto.spec != "auto"  # a cache stamped by the old auto (classical) is not reused
    assert LungsSpec.parse(auto.spec) == auto  # what meta.json records parses back (resume)
    assert LungsSpec.parse("masks").spec == f"masks+unet@{digest}" and LungsSpec.parse("masks").mode == "masks"
    shipped = LungsSpec.parse("unet")
    assert (shipped.spec, shipped.use_dataset_masks, shipped.mode) == (f"unet@{digest}", False, "unet")
    assert LungsSpec.parse("classical").spec == "classical"
    with pytest.raises(GrenError, match="another shipped lung U-Net"):
        LungsSpec.parse("auto+unet@0123456789abcdef")
    with pytest.raises(GrenError, match="expected auto"):
        LungsSpec.parse("auto+bogus")


def test_old_classical_auto_cache_is_not_silently_reused(synth_dir, tmp_path):
    """A cache stamped ``lungs: auto`` by the old auto (= classical) is refused, and rebuilt with --force."""
    bare = tmp_path / "bare"
    shutil.copytree(synth_dir, bare)
    shutil.rmtree(bare / "masks")
    out = tmp_path / "cache"
    prepare_cache(bare, out, size=64, lungs="classical", workers=1, progress=False)
    meta = fmt.read_meta(out)
    meta["params"]["lungs"] = "auto"  # what the old auto recorded
    fmt.write_json_atomic(out / fmt.META_FILE, meta)
    with pytest.raises(GrenError, match="lungs spec 'auto' -> 'auto\\+unet@"):
        prepare_cache(bare, out, size=64, lungs="auto", workers=1, progress=False)
    summary = prepare_cache(bare, out, size=64, lungs="auto", workers=1, force=True, progress=False)
    assert summary["mask_sources"] == {"unet": 4} and not summary["reused"]
