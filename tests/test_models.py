"""Backbones (grayscale stem, weights, output stride) and the grid head."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from gren.core.errors import GrenError
from gren.models.backbone import build_backbone, gray_stem
from gren.models.grid import GridHead
from gren.models.tv import import_torchvision

torchvision = import_torchvision()


@pytest.mark.parametrize(
    ("name", "stride", "channels"),
    [("resnet18", 32, 512), ("resnet18", 16, 512), ("resnet34", 16, 512), ("resnet50", 16, 2048)],
)
def test_backbone_shapes(name, stride, channels):
    backbone = build_backbone(name, "none", stride)
    features = backbone(torch.randn(2, 1, 64, 64))
    assert features.shape == (2, channels, 64 // stride, 64 // stride)
    assert backbone.out_channels == channels and backbone.stride == stride


def test_gray_stem_equals_rgb_network_on_replicated_gray():
    conv = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    gray = torch.randn(2, 1, 32, 32)
    rgb_out = conv(gray.repeat(1, 3, 1, 1))
    gray_out = torch.nn.functional.conv2d(gray, gray_stem(conv.weight), stride=2, padding=3)
    torch.testing.assert_close(gray_out, rgb_out, rtol=1e-4, atol=1e-5)


def test_weights_from_a_torchvision_state_dict_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", str(path), 32)
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(GrenError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "missing.pt"))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(GrenError, match="do not fit resnet18"):
        build_backbone("resnet18", str(tmp_path / "r50.pt"))
    with pytest.raises(GrenError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(GrenError, match="output_stride"):
        build_backbone("resnet18", "none", 4)


def test_imagenet_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(GrenError, match="ImageNet weights for resnet18.*model.weights"):
        build_backbone("resnet18", "imagenet")


def test_random_init_is_logged(caplog):
    with caplog.at_level("INFO", logger="gren.models.backbone"):
        build_backbone("resnet18", "none")
    assert "random initialisation" in caplog.text


def test_grid_head_shapes_and_prior():
    head = GridHead(16, num_classes=14, hidden=8, upsample=2, prior=0.01).eval()
    logits = head(torch.randn(3, 16, 4, 4))
    assert logits.shape == (3, 14, 8, 8)
    probs = torch.sigmoid(logits)
    assert probs.mean().item() == pytest.approx(0.01, rel=0.5)
    with pytest.raises(ValueError):
        GridHead(16, upsample=0)


def test_torchvision_imports_with_or_without_its_compiled_operators():
    """A CPU torch beside a CUDA-built torchvision (the small CPU install) must still give the models."""
    import subprocess
    import sys

    code = (
        "import gren.models.tv as tv, torch\n"
        "compiled = tv._compiled_ops_load()\n"
        "torchvision = tv.import_torchvision()\n"
        "assert torchvision.models.resnet18(weights=None).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)\n"
        "if not compiled:\n"
        "    try:\n"
        "        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "    except RuntimeError as err:\n"
        "        assert 'C++ ops' in str(err) or 'torchvision::nms' in str(err), err\n"
        "    else:\n"
        "        raise AssertionError('nms ran without compiled operators')\n"
        "print('compiled' if compiled else 'python-only')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("compiled", "python-only")


def test_resnet_normalization_is_identity_on_grens_scale():
    """ResNets train on GREN's scale as before: ``auto`` is the identity, forward unchanged."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", "none", 32).eval()
    assert backbone.input_normalization.is_identity and backbone.input_normalization.name == "gren"
    images = torch.randn(1, 1, 64, 64).clamp(-2, 2)
    with torch.no_grad():
        manual = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        manual = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(manual))))
        torch.testing.assert_close(backbone(images), manual)
    imagenet = build_backbone("resnet18", "none", 32, normalization="imagenet").eval()
    imagenet.load_state_dict(backbone.state_dict())
    norm = imagenet.input_normalization
    assert norm.mean == pytest.approx(0.449) and norm.std == pytest.approx(0.226)
    with torch.no_grad():
        torch.testing.assert_close(imagenet(images), backbone(((images * 0.25 + 0.5) - norm.mean) / norm.std),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(GrenError, match="needs a timm backbone"):
        build_backbone("resnet18", "none", 32, normalization="timm")
    with pytest.raises(GrenError, match="unknown model.normalization 'zscore'"):
        build_backbone("resnet18", "none", 32, normalization="zscore")


def test_normalization_constants_match_the_data_pipeline():
    from gren.data.dataset import NORM_MEAN, NORM_STD, normalize_uint8
    from gren.models.normalization import GREN_MEAN, GREN_STD, XRV

    assert (GREN_MEAN, GREN_STD) == (NORM_MEAN, NORM_STD)
    pixels = torch.tensor([0, 64, 255], dtype=torch.uint8)
    xrv_scale = (pixels.float() / 255 * 2 - 1) * 1024  # torchxrayvision.datasets.normalize(img, 255)
    torch.testing.assert_close(XRV(normalize_uint8(pixels)), xrv_scale)


def test_resnet_weight_mismatch_names_keys_and_counts(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(GrenError, match=r"1 missing \(layer4.1.bn2.weight\); 1 unexpected \(extra.weight\); "
                                        r"1 of another shape \(layer1.0.conv1.weight \(64, 64, 1, 1\) != \(64, 64, 3, 3\)\)"):
        build_backbone("resnet18", str(tmp_path / "bad.pt"))
