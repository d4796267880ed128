"""Models (learn/models.py): the CNN family, ResNet inits, offline weights, safe loading."""

from __future__ import annotations

import json
import pickle
import re
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from bonedamage.learn import models
from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.learn.models import WeightsError
from conftest import RunsCode

ARCH = {
    "n_blocks": 3,
    "base_filters": 8,
    "filter_growth": 1.5,  # 8, 12, 18 filters: GroupNorm must cope with 12 and 18
    "kernel_size": 3,
    "norm": "batch",
    "pool": "max",
    "dropout": 0.1,
    "dense_units": 16,
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache: TORCH_HOME points into tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub"


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"norm": "group", "pool": "avg", "kernel_size": 5},
        {"norm": "none", "n_blocks": 5, "filter_growth": 1.0, "dropout": 0.0},
        {"n_blocks": 2, "base_filters": 16, "filter_growth": 2, "dense_units": 32},
    ],
)
def test_cnn_family_shapes(change: dict) -> None:
    arch = {**ARCH, **change}
    model = models.build_cnn(arch).eval()
    for size in (64, 32):
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 2)
    assert len(model.features) == arch["n_blocks"]
    assert models.gradcam_target_layer(model) is model.features[-1]
    convs = [m for m in model.features[-1] if isinstance(m, nn.Conv2d)]
    growth = arch["filter_growth"] ** (arch["n_blocks"] - 1)
    assert convs[-1].out_channels == round(arch["base_filters"] * growth)


def test_cnn_rejects_tiles_smaller_than_its_pooling() -> None:
    model = models.build_cnn({**ARCH, "n_blocks": 4}).eval()
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 2)
    with pytest.raises(ValueError, match="16 px"):
        model(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kernel_size", 4),
        ("n_blocks", 6),
        ("n_blocks", 2.0),
        ("norm", "layer"),
        ("pool", "median"),
        ("dropout", 0.9),
        ("base_filters", 0),
        ("dense_units", True),
    ],
)
def test_cnn_arch_values_are_checked(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        models.build_cnn({**ARCH, key: value})


def test_cnn_arch_keys_are_checked_and_size_grows() -> None:
    with pytest.raises(ValueError, match="missing 'pool'"):
        models.build_cnn({k: v for k, v in ARCH.items() if k != "pool"})
    with pytest.raises(ValueError, match="dense_unit"):
        models.build_cnn({**ARCH, "dense_unit": 8})
    small = models.count_parameters(models.build_cnn(ARCH))
    assert models.count_parameters(models.build_cnn({**ARCH, "base_filters": 16})) > small


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnets_take_one_channel(arch: str) -> None:
    model = models.build_resnet(arch).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)
    assert model.conv1.in_channels == 1 and model.conv1.bias is None
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert models.gradcam_target_layer(model) is model.layer4[-1]
    rotation = models.pretrained_model(arch, models.DEFAULT_STEM, 1, head_classes=4)
    assert rotation.fc.out_features == 4 and rotation.conv1.stride == (2, 2)
    simsiam = models.pretrained_model(arch, models.DEFAULT_STEM, 1, head_classes=0).eval()
    assert isinstance(simsiam.fc, nn.Identity)
    with torch.no_grad():  # the pooled features themselves: 512 (resnet18) or 2048 wide
        assert simsiam(torch.zeros(2, 1, 32, 32)).shape == (2, 512 if arch == "resnet18" else 2048)


def first_block_size(model: torch.nn.Module, px: int) -> tuple[int, int]:
    seen = []
    hook = model.layer1.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, px, px))
    hook.remove()
    return tuple(seen[0][-2:])


def test_fine_stem_keeps_twice_the_resolution_and_takes_imagenet_weights(
    tmp_path: Path,
) -> None:
    assert first_block_size(models.build_resnet("resnet18"), 64) == (16, 16)
    fine = models.build_resnet("resnet18", stem="fine")
    assert fine.conv1.stride == (1, 1) and first_block_size(fine, 64) == (32, 32)
    assert models.pretrained_model("resnet18", "fine", 1, 4).conv1.stride == (1, 1)
    state = imagenet_like(tmp_path / "w.pth")  # same weight shapes: ImageNet weights fit
    model = models.resnet_from_init(
        "resnet18", "imagenet", weights_path=tmp_path / "w.pth", stem="fine"
    )
    assert model.conv1.stride == (1, 1)
    assert torch.equal(model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"stem 'wide'.*fine"):
        models.build_resnet("resnet18", stem="wide")


def test_build_module_rebuilds_a_saved_model_from_its_sidecar(tmp_path: Path) -> None:
    torch.manual_seed(3)
    fine = models.build_resnet("resnet18", stem="fine").eval()
    torch.save(fine.state_dict(), tmp_path / "r.pt")
    meta = {"kind": "resnet", "arch": "resnet18", "stem": "fine"}
    loaded = models.build_module(meta, tmp_path / "r.pt")
    x = torch.rand(2, 1, 64, 64)
    assert not loaded.training and loaded.conv1.stride == (1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), fine(x))
    old = models.build_module({"kind": "resnet", "arch": "resnet18"})  # sidecars before stems
    assert old.conv1.stride == (2, 2) and old.training
    with pytest.raises(RuntimeError, match="size mismatch"):  # weights of another arch
        models.build_module({"kind": "resnet", "arch": "resnet50"}, tmp_path / "r.pt")
    cnn = models.build_module({"kind": "cnn", "arch": ARCH})
    assert isinstance(cnn, models.CNN)
    meta = {"kind": "pretrained", "arch": "resnet18", "stem": "fine", "in_channels": 3}
    procedural = models.build_module({**meta, "head_classes": 7})
    assert procedural.fc.out_features == 7 and procedural.conv1.stride == (1, 1)
    assert procedural.conv1.in_channels == 3
    assert isinstance(models.build_module({**meta, "head_classes": 0}).fc, nn.Identity)
    assert isinstance(models.build_module(meta).fc, nn.Identity)  # no head: a backbone
    for kind in ("vit", "pretext"):  # the rotation pretext of old is a pretrained kind now
        with pytest.raises(WeightsError, match=f"kind '{kind}'.*pretrained"):
            models.build_module({"kind": kind, "arch": "resnet18"})


def test_an_ensemble_is_the_mean_probability_of_its_members(tmp_path: Path) -> None:
    torch.manual_seed(4)
    members = [models.build_cnn(ARCH, 3).eval() for _ in range(3)]
    ensemble = models.Ensemble(members).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        out = ensemble(x)
    torch.testing.assert_close(out.softmax(1), mean)  # it stands where logits stand
    torch.testing.assert_close(out.exp(), mean)
    torch.save(ensemble.state_dict(), tmp_path / "e.pt")
    meta = {"kind": "cnn", "arch": ARCH, "in_channels": 3, "members": 3}
    loaded = models.build_module(meta, tmp_path / "e.pt")
    assert isinstance(loaded, models.Ensemble) and len(loaded.members) == 3
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # 3 members' weights into 2
        models.build_module({**meta, "members": 2}, tmp_path / "e.pt")
    for bad in (0, "2", 1.5):
        with pytest.raises(WeightsError, match="members"):
            models.build_module({**meta, "members": bad})
    with pytest.raises(WeightsError, match="members"):
        models.build_module({"kind": "resnet", "arch": "resnet18", "members": 2})
    with pytest.raises(ValueError, match="at least 2 members"):
        models.Ensemble(members[:1])


HEADS = {"procedural": 7, "simsiam": 0, "rotation": 4}  # the pretraining tasks' outputs


def save_pretrained(
    path: Path, method: str, arch: str = "resnet18", stem: str = "imagenet", channels: int = 1
) -> nn.Module:
    """A backbone pretrained by ``method`` (seeded random weights, some set to known
    values) and its sidecar, as the pretrain stage saves them."""
    torch.manual_seed(1)
    model = models.pretrained_model(arch, stem, channels, HEADS[method])
    with torch.no_grad():
        model.layer2[1].conv1.weight.fill_(0.5)
        model.bn1.running_mean.fill_(0.25)
    meta = {"kind": "pretrained", "method": method, "arch": arch, "stem": stem}
    save_checkpoint(path, model, meta | {"in_channels": channels, "head_classes": HEADS[method]})
    return model


@pytest.mark.parametrize(
    ("sidecar", "init", "arch", "stem", "refusal"),
    [
        ({}, "simsiam", "resnet18", "imagenet", r"by 'rotation' .* not by 'simsiam'"),
        ({}, "rotation", "resnet18", "fine", r"with stem 'imagenet' .* with stem 'fine'"),
        ({"arch": "resnet50"}, "rotation", "resnet18", "imagenet", r"as resnet50 .* is resnet18"),
        ({"stem": "fine"}, "rotation", "resnet18", "imagenet", r"stem 'fine' .* stem 'imagenet'"),
        ({"method": None}, "rotation", "resnet18", "imagenet", r"by None .* not by 'rotation'"),
    ],
)
def test_a_backbone_whose_sidecar_names_another_method_arch_or_stem_is_refused(
    tmp_path: Path, sidecar: dict, init: str, arch: str, stem: str, refusal: str
) -> None:
    """A stride-2 backbone fits a stride-1 stem shape for shape, and a backbone of one
    method loads as another's: only the sidecar tells."""
    path = tmp_path / "rotation.pt"
    save_pretrained(path, "rotation")
    models.resnet_from_init("resnet18", "rotation", pretrained_path=path)  # as saved: loads
    meta = json.loads(path.with_suffix(".json").read_text()) | sidecar
    path.with_suffix(".json").write_text(
        json.dumps({k: v for k, v in meta.items() if v is not None})
    )
    with pytest.raises(WeightsError, match=rf"rotation\.pt: .*{refusal}"):
        models.resnet_from_init(arch, init, pretrained_path=path, stem=stem)


def test_a_backbone_without_its_sidecar_is_refused(tmp_path: Path) -> None:
    save_pretrained(tmp_path / "procedural.pt", "procedural")
    (tmp_path / "procedural.json").unlink()
    with pytest.raises(WeightsError, match=r"procedural\.pt: no sidecar procedural\.json"):
        models.resnet_from_init(
            "resnet18", "procedural", pretrained_path=tmp_path / "procedural.pt"
        )


@pytest.mark.parametrize("method", ["procedural", "simsiam", "rotation"])
def test_a_missing_backbone_is_refused_naming_the_stage_that_makes_it(
    tmp_path: Path, method: str
) -> None:
    for path in (None, tmp_path / f"{method}.pt"):
        with pytest.raises(WeightsError, match=rf"{method} pretrained weights not found at"):
            models.resnet_from_init("resnet18", method, pretrained_path=path)
    with pytest.raises(WeightsError, match=rf"--method {method}"):
        models.resnet_from_init("resnet18", method, pretrained_path=tmp_path / f"{method}.pt")


def imagenet_like(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-format (3-channel conv1) resnet18 state dict with known values."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer3.0.conv1.weight"].fill_(0.25)
    torch.save(state, path)
    return state


def test_imagenet_init_from_a_weights_file(tmp_path: Path, hub_dir: Path) -> None:
    state = imagenet_like(tmp_path / "w.pth")
    model = models.resnet_from_init("resnet18", "imagenet", weights_path=tmp_path / "w.pth")
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])
    assert model.fc.out_features == 2
    with pytest.raises(WeightsError, match="weights_path"):
        models.resnet_from_init("resnet18", "imagenet", weights_path=tmp_path / "none.pth")
    with pytest.raises(WeightsError, match=r"w\.pth"):  # resnet18 weights do not fit resnet50
        models.resnet_from_init("resnet50", "imagenet", weights_path=tmp_path / "w.pth")


def test_imagenet_init_from_the_torch_cache_and_the_offline_error(hub_dir: Path) -> None:
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError) as err:
        models.resnet_from_init("resnet18", "imagenet")
    message = str(err.value)
    assert str(expected) in message and "weights_path" in message
    assert "downloaded" in message
    expected.parent.mkdir(parents=True)
    state = imagenet_like(expected)
    model = models.resnet_from_init("resnet18", "imagenet")
    assert torch.equal(model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth"):
        models.imagenet_state_dict("resnet50")


def test_adapt_first_conv() -> None:
    rgb = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    other = torch.ones(3)
    state = {"conv1.weight": rgb, "bn1.weight": other}
    out = models.adapt_first_conv(state)
    assert out["conv1.weight"].shape == (2, 1, 2, 2)
    assert torch.equal(out["conv1.weight"][:, 0], rgb[:, 0] + rgb[:, 1] + rgb[:, 2])
    assert out["bn1.weight"] is other and state["conv1.weight"] is rgb  # input untouched
    grey = {"conv1.weight": rgb[:, :1]}
    assert torch.equal(models.adapt_first_conv(grey)["conv1.weight"], rgb[:, :1])
    with pytest.raises(WeightsError, match=r"conv1\.weight"):
        models.adapt_first_conv({"bn1.weight": other})


def test_25d_models_take_three_planes(tmp_path: Path, hub_dir: Path) -> None:
    """2.5-D tiles: three input channels for the CNN, the ResNets and their saved forms; an
    ImageNet filter is shared by the planes, so three equal planes give the grey response."""
    x = torch.rand(2, 3, 16, 16)
    cnn = models.build_cnn(ARCH, 3).eval()
    assert cnn.features[0][0].in_channels == 3 and cnn(x).shape == (2, 2)
    torch.save(cnn.state_dict(), tmp_path / "c.pt")
    loaded = models.build_module({"kind": "cnn", "arch": ARCH, "in_channels": 3}, tmp_path / "c.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), cnn(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # 3-plane weights, 1-plane sidecar
        models.build_module({"kind": "cnn", "arch": ARCH}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="in_channels 0"):
        models.build_cnn(ARCH, 0)
    assert models.pretrained_model("resnet18", "imagenet", 3, 0).conv1.in_channels == 3
    state = imagenet_like(tmp_path / "w.pth")
    three = models.resnet_from_init(
        "resnet18", "imagenet", weights_path=tmp_path / "w.pth", in_channels=3
    ).eval()
    grey = models.resnet_from_init("resnet18", "imagenet", weights_path=tmp_path / "w.pth").eval()
    assert three.conv1.weight.shape == (64, 3, 7, 7)
    torch.testing.assert_close(three.conv1.weight.sum(1), state["conv1.weight"].sum(1))
    plane = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(three.conv1(plane.repeat(1, 3, 1, 1)), grey.conv1(plane))


@pytest.mark.parametrize(
    ("method", "stem"), [("procedural", "imagenet"), ("simsiam", "fine"), ("rotation", "imagenet")]
)
def test_each_pretrained_init_takes_the_backbone_and_a_fresh_head(
    tmp_path: Path, method: str, stem: str
) -> None:
    path = tmp_path / f"{method}.pt"
    backbone = save_pretrained(path, method, stem=stem, channels=3)
    torch.manual_seed(5)
    model = models.resnet_from_init(
        "resnet18", method, pretrained_path=path, stem=stem, in_channels=3
    )
    backbone_keys = {k for k in backbone.state_dict() if not k.startswith("fc.")}
    assert backbone_keys == {k for k in model.state_dict() if not k.startswith("fc.")}
    for key in backbone_keys:
        assert torch.equal(model.state_dict()[key], backbone.state_dict()[key]), key
    assert model.conv1.stride == ((1, 1) if stem == "fine" else (2, 2))
    assert model.fc.weight.shape == (2, 512)  # the classifier's own head, not the task's
    torch.manual_seed(5)
    fresh = models.build_resnet("resnet18", stem=stem, in_channels=3)
    assert torch.equal(model.fc.weight, fresh.fc.weight)  # as a scratch head is drawn
    assert not torch.equal(model.layer2[1].conv1.weight, fresh.layer2[1].conv1.weight)


def test_a_backbone_of_three_planes_fits_one_plane_tiles_and_back(tmp_path: Path) -> None:
    """2.5-D pretraining, 2-D fine-tuning (and the converse): the first convolution is
    adapted as ImageNet's is, so a plane repeated over the channels gives the same response."""
    three = save_pretrained(tmp_path / "three" / "simsiam.pt", "simsiam", channels=3).eval()
    one = models.resnet_from_init(
        "resnet18", "simsiam", pretrained_path=tmp_path / "three" / "simsiam.pt"
    ).eval()
    assert one.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(one.conv1.weight, three.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(one.layer2[1].conv1.weight, three.layer2[1].conv1.weight)
    plane = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(one.conv1(plane), three.conv1(plane.repeat(1, 3, 1, 1)))
    grey = save_pretrained(tmp_path / "one" / "rotation.pt", "rotation", channels=1).eval()
    spread = models.resnet_from_init(
        "resnet18", "rotation", pretrained_path=tmp_path / "one" / "rotation.pt", in_channels=3
    ).eval()
    assert spread.conv1.weight.shape == (64, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(spread.conv1(plane.repeat(1, 3, 1, 1)), grey.conv1(plane))


def test_scratch_init_and_unknown_names() -> None:
    torch.manual_seed(2)
    model = models.resnet_from_init("resnet18", "scratch")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 2
    with pytest.raises(ValueError, match=r"init 'nope'.*'procedural', 'simsiam', 'rotation'"):
        models.resnet_from_init("resnet18", "nope")
    with pytest.raises(ValueError, match=r"arch 'vgg16'.*resnet50"):
        models.build_resnet("vgg16")


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module
    elif kind == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "non_tensor":
        torch.save({"w": torch.zeros(1), "note": "hello"}, path)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty":
        torch.save({}, path)
    elif kind == "evil_torch":
        torch.save({"w": RunsCode(tmp_path / "pwned")}, path)
    elif kind == "evil_pickle":
        path.write_bytes(pickle.dumps({"w": RunsCode(tmp_path / "pwned")}, protocol=2))
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "module",
        "garbage",
        "truncated",
        "list",
        "non_tensor",
        "empty",
        "evil_torch",
        "evil_pickle",
        "missing",
    ],
)
def test_weights_files_that_are_not_state_dicts_are_refused(tmp_path: Path, kind: str) -> None:
    path = bad_file(tmp_path, kind)
    with pytest.raises(WeightsError) as err:
        models.load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_wrapped_checkpoints_load(tmp_path: Path) -> None:
    state = models.build_cnn(ARCH).state_dict()
    for wrapper in ("state_dict", "model"):
        torch.save({"epoch": 3, wrapper: state}, tmp_path / "c.pt")
        loaded = models.load_state_dict_file(tmp_path / "c.pt")
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_freezing_leaves_only_the_head_trainable() -> None:
    cnn, resnet = models.build_cnn(ARCH), models.build_resnet("resnet18")
    for model, head in ((cnn, cnn.head), (resnet, resnet.fc)):
        total = models.count_parameters(model)
        models.set_backbone_trainable(model, False)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in head.parameters()}
        assert models.count_parameters(model, trainable_only=True) == sum(
            p.numel() for p in head.parameters()
        )
        models.set_backbone_trainable(model, True)
        assert all(p.requires_grad for p in model.parameters())
        assert models.count_parameters(model, trainable_only=True) == total


def test_gradcam_target_layer_fallback_and_error() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert models.gradcam_target_layer(model) is conv
    with pytest.raises(ValueError, match="convolutional"):
        models.gradcam_target_layer(nn.Sequential(nn.Linear(2, 2)))
