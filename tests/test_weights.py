"""load_weights and the torchvision export, checked against torchvision's own state dicts.

Nothing downloads: URLs are file:// URLs of files the tests write, and the torchvision:
shorthand is resolved against torchvision's own weight enums and a pre-seeded cache.
"""

import argparse
import hashlib
import sys
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from jaxsft.models import list_models
from jaxsft.weights import (
    WeightsError,
    cache_path,
    fetch,
    from_torch_state_dict,
    infer_arch,
    load_weights,
    save_torch_state_dict,
    to_torch_state_dict,
    torchvision_url,
)


def torchvision_state_dict(arch="resnet18", num_classes=1000, seed=0):
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(num_classes=num_classes).state_dict()


def meta_state_dict(arch):
    """torchvision's keys and shapes for `arch`, as free zero arrays (no weights built)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    return {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()}


@pytest.fixture
def resnet18_pth(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state_dict(), path)
    return path


def torch_layout(variables_value):
    """A Flax variable in torch's layout, transposed here independently of jaxsft.weights."""
    value = np.asarray(variables_value)
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def flax_leaves_as_torch(variables):
    """{torch key: value} for every Flax leaf, by the documented naming rule."""
    names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            parts = [p.key for p in path]
            module = ".".join(parts[:-1]).replace("_", ".")
            out[f"{module}.{names[parts[-1]]}"] = torch_layout(leaf)
    return out


# ----------------------------------------------------------------------------- values and head


def test_loaded_values_equal_torchvision_bit_for_bit(resnet18_pth):
    expected = torchvision_state_dict()
    ours = flax_leaves_as_torch(load_weights(resnet18_pth, "resnet18"))
    assert set(ours) == {k for k in expected if not k.endswith("num_batches_tracked")}
    for key, value in ours.items():
        assert np.array_equal(value, expected[key].numpy()), key


@pytest.mark.parametrize("num_classes", [None, 1000])
def test_head_kept_when_classes_match(resnet18_pth, num_classes):
    variables = load_weights(resnet18_pth, "resnet18", num_classes=num_classes)
    expected = torchvision_state_dict()
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], expected["fc.weight"].T)
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], expected["fc.bias"])


def test_head_reinitialised_rest_bit_identical(resnet18_pth):
    variables = load_weights(resnet18_pth, "resnet18", num_classes=10, rng=jax.random.key(0))
    expected = torchvision_state_dict()
    ours = flax_leaves_as_torch(variables)
    for key, value in ours.items():
        if not key.startswith("fc."):
            assert np.array_equal(value, expected[key].numpy()), key
    kernel, bias = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
    assert kernel.shape == (512, 10) and bias.shape == (10,) and kernel.dtype == jnp.float32
    bound = 1 / np.sqrt(512)  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), both
    for value in (kernel, bias):
        assert float(jnp.abs(value).max()) <= bound and float(jnp.abs(value).max()) > 0.7 * bound
    assert abs(float(kernel.std()) - bound / np.sqrt(3)) < 0.05 * bound  # uniform, not normal
    again = load_weights(resnet18_pth, "resnet18", num_classes=10, rng=jax.random.key(0))
    other = load_weights(resnet18_pth, "resnet18", num_classes=10, rng=jax.random.key(1))
    assert np.array_equal(again["params"]["fc"]["kernel"], kernel)
    assert not np.array_equal(other["params"]["fc"]["kernel"], kernel)


@pytest.mark.parametrize("head_init", ["default", "zeros"])
def test_head_init_applies_only_to_a_replaced_head(resnet18_pth, head_init):
    rng = None if head_init == "zeros" else jax.random.key(0)  # zeros needs no rng
    variables = load_weights(resnet18_pth, "resnet18", num_classes=10, rng=rng,
                             head_init=head_init)
    head = variables["params"]["fc"]
    assert head["kernel"].shape == (512, 10) and head["bias"].shape == (10,)
    assert head["kernel"].dtype == head["bias"].dtype == jnp.float32
    assert bool(jnp.all(head["kernel"] == 0)) == (head_init == "zeros")
    assert bool(jnp.all(head["bias"] == 0)) == (head_init == "zeros")
    kept = load_weights(resnet18_pth, "resnet18", num_classes=1000, head_init=head_init)
    np.testing.assert_array_equal(kept["params"]["fc"]["kernel"],
                                  torchvision_state_dict()["fc.weight"].T)
    with pytest.raises(WeightsError, match="head_init must be one of default, zeros"):
        load_weights(resnet18_pth, "resnet18", num_classes=10, head_init="xavier")


def test_head_reinitialisation_needs_rng(resnet18_pth):
    with pytest.raises(WeightsError, match=r"1000-class head.*10 classes needs rng"):
        load_weights(resnet18_pth, "resnet18", num_classes=10)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_bad_num_classes(resnet18_pth, num_classes):
    with pytest.raises(WeightsError, match="num_classes must be a positive int"):
        load_weights(resnet18_pth, "resnet18", num_classes=num_classes, rng=0)


def test_headless_backbone_gets_a_new_head(tmp_path):
    state_dict = {k: v for k, v in torchvision_state_dict().items() if not k.startswith("fc.")}
    torch.save(state_dict, tmp_path / "backbone.pth")
    with pytest.raises(WeightsError, match="no classifier head.*pass num_classes and rng"):
        load_weights(tmp_path / "backbone.pth", "resnet18")
    variables = load_weights(tmp_path / "backbone.pth", "resnet18", num_classes=3, rng=0)
    assert variables["params"]["fc"]["kernel"].shape == (512, 3)


def test_loaded_arrays_do_not_alias_torch_tensors():
    """torch updates running statistics in place; loaded arrays must not change with them."""
    model = torchvision.models.resnet18()
    variables = from_torch_state_dict(model.state_dict(), "resnet18")
    before = np.array(variables["batch_stats"]["bn1"]["mean"])
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    assert not np.array_equal(model.bn1.running_mean.numpy(), before)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], before)


# ----------------------------------------------------------------------------- file formats


def test_safetensors_needs_no_torch_and_pth_names_the_fix(tmp_path, monkeypatch):
    state_dict = torchvision_state_dict()
    save_file(state_dict, tmp_path / "w.safetensors")
    torch.save(state_dict, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    variables = load_weights(tmp_path / "w.safetensors", "resnet18")
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], state_dict["fc.bias"])
    with pytest.raises(WeightsError, match=r"pip install jaxsft\[torch\].*\.safetensors"):
        load_weights(tmp_path / "w.pth", "resnet18")


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module", "state_dict+module"])
def test_training_checkpoints_and_ddp_prefix(tmp_path, wrap):
    state_dict = torchvision_state_dict()
    saved = dict(state_dict)
    if "module" in wrap:
        saved = {f"module.{k}": v for k, v in saved.items()}
    if wrap.startswith(("state_dict", "model")):
        saved = {wrap.split("+")[0]: saved, "epoch": 7}
    torch.save(saved, tmp_path / "ckpt.pth")
    variables = load_weights(tmp_path / "ckpt.pth", "resnet18")
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  state_dict["conv1.weight"].permute(2, 3, 1, 0))


def test_pickled_objects_are_refused_with_the_fix(tmp_path):
    torch.save({"state_dict": torchvision_state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp_path / "timm_train.pth")
    with pytest.raises(WeightsError, match=r"weights_only=True.*model\.state_dict\(\)"):
        load_weights(tmp_path / "timm_train.pth", "resnet18")


def test_corrupt_files(tmp_path):
    for name in ("bad.pth", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"not a weights file")
        with pytest.raises(WeightsError, match="cannot read"):
            load_weights(tmp_path / name, "resnet18")


def test_dtypes(tmp_path):
    state_dict = torchvision_state_dict()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        save_file({k: v.to(dtype) if v.is_floating_point() else v
                   for k, v in state_dict.items()}, tmp_path / "w.safetensors")
        variables = load_weights(tmp_path / "w.safetensors", "resnet18")
        assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
        expected = state_dict["fc.bias"].to(dtype).double().numpy()
        np.testing.assert_array_equal(variables["params"]["fc"]["bias"], expected.astype(
            np.float32))
    with pytest.raises(WeightsError, match="x64"):
        load_weights(tmp_path / "w.safetensors", "resnet18", dtype=jnp.float64)
    variables = load_weights(tmp_path / "w.safetensors", "resnet18", dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}


def test_float64_file_stays_float64_under_x64(tmp_path, x64):
    state_dict = {k: v.double() if v.is_floating_point() else v
                  for k, v in torchvision_state_dict().items()}
    torch.save(state_dict, tmp_path / "w.pth")
    variables = load_weights(tmp_path / "w.pth", "resnet18", num_classes=4, rng=0)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float64)}
    np.testing.assert_array_equal(variables["params"]["layer4_1"]["bn2"]["scale"],
                                  state_dict["layer4.1.bn2.weight"].numpy())


# ----------------------------------------------------------------------------- strict mapping


def test_missing_tensor_is_named(tmp_path):
    state_dict = torchvision_state_dict()
    del state_dict["layer2.0.bn1.running_var"]
    torch.save(state_dict, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"missing tensor 'layer2\.0\.bn1\.running_var'"):
        load_weights(tmp_path / "w.pth", "resnet18")


def test_unexpected_tensor_is_named(tmp_path):
    state_dict = torchvision_state_dict()
    state_dict["layer3.1.extra.weight"] = torch.zeros(3)
    torch.save(state_dict, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"unexpected tensor 'layer3\.1\.extra\.weight'"):
        load_weights(tmp_path / "w.pth", "resnet18")


def test_misshapen_tensor_is_named(tmp_path):
    state_dict = torchvision_state_dict()
    state_dict["layer1.1.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state_dict, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"'layer1\.1\.conv2\.weight' has shape "
                                           r"\(64, 64, 1, 1\), resnet18 needs \(64, 64, 3, 3\)"):
        load_weights(tmp_path / "w.pth", "resnet18")


def test_foreign_state_dict_is_described(tmp_path):
    save_file({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not look like a torchvision/timm ResNet"):
        load_weights(tmp_path / "w.safetensors", "resnet18")


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_is_recognised_from_its_state_dict(arch):
    state_dict = meta_state_dict(arch)
    assert infer_arch(state_dict) == arch
    wrong = "resnet18" if arch != "resnet18" else "resnet34"
    with pytest.raises(WeightsError, match=rf"holds {arch} weights, not {wrong}: "
                                           rf"pass arch='{arch}'"):
        from_torch_state_dict(state_dict, wrong)


def test_wrong_arch_from_a_file(tmp_path):
    torch.save(torchvision_state_dict("resnext50_32x4d"), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="holds resnext50_32x4d weights, not resnet50: "
                                           "pass arch='resnext50_32x4d'"):
        load_weights(tmp_path / "w.pth", "resnet50")


def test_unknown_architecture_is_described():
    state_dict = meta_state_dict("resnet50")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("layer3.5.")}
    with pytest.raises(WeightsError, match=r"bottleneck \(groups 1, width per group 64\) "
                                           r"blocks \(3, 4, 5, 3\), which is none of"):
        from_torch_state_dict(state_dict, "resnet50")


# ----------------------------------------------------------------------------- sources


def test_missing_file_and_unknown_kinds(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth does not exist.*torchvision:"):
        load_weights(tmp_path / "nope.pth", "resnet18")
    for source in ("s3://bucket/w.pth", "hf:timm/resnet50"):
        with pytest.raises(WeightsError, match="unknown weights source scheme"):
            load_weights(source, "resnet18")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"unknown weight file type '\.npz'"):
        load_weights(tmp_path / "w.npz", "resnet18")
    with pytest.raises(WeightsError, match="holds no jaxsft_weights.json"):
        load_weights(tmp_path, "resnet18")
    with pytest.raises(WeightsError, match="unknown architecture 'resnet19'.*resnet18"):
        load_weights(tmp_path / "w.npz", "resnet19")


def test_file_url_is_downloaded_once_with_its_hash_checked(tmp_path, monkeypatch):
    source = tmp_path / "src" / "resnet18.pth"
    source.parent.mkdir()
    torch.save(torchvision_state_dict(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = source.with_name(f"resnet18-{digest[:8]}.pth")  # torch.hub's naming convention
    source.rename(named)
    url = named.as_uri()
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))

    variables = load_weights(url, "resnet18")
    cached = cache_path(url)
    assert cached.is_file() and cached.parent.parent == tmp_path / "cache"
    assert cached.name == named.name and cached.read_bytes() == named.read_bytes()
    named.unlink()  # the second load must come from the cache
    again = load_weights(url, "resnet18")
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"],
                                  variables["params"]["fc"]["kernel"])
    assert [p.name for p in cached.parent.iterdir()] == [named.name]  # no temporary left


def test_hash_mismatch_caches_nothing(tmp_path):
    source = tmp_path / "resnet18-deadbeef.pth"
    torch.save(torchvision_state_dict(), source)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="does not start with 'deadbeef'"):
        load_weights(source.as_uri(), "resnet18", cache_dir=cache)
    assert not cache_path(source.as_uri(), cache).exists()
    assert list(cache_path(source.as_uri(), cache).parent.iterdir()) == []

    plain = tmp_path / "weights.pth"
    torch.save(torchvision_state_dict(), plain)
    with pytest.raises(WeightsError, match="does not match the expected"):
        fetch(plain.as_uri(), cache_dir=cache, sha256="0" * 64)
    good = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert fetch(plain.as_uri(), cache_dir=cache, sha256=good).read_bytes() == plain.read_bytes()


def test_download_failure_is_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="could not download .*download the file yourself"):
        load_weights((tmp_path / "absent.pth").as_uri(), "resnet18", cache_dir=tmp_path)


def test_torchvision_table_matches_torchvision():
    enums = {arch: torchvision.models.get_model_weights(arch) for arch in list_models()}
    for arch, enum in enums.items():
        for member in enum:
            assert torchvision_url(f"{arch}.{member.name}") == member.url
        assert torchvision_url(f"{arch}.DEFAULT") == enum.DEFAULT.url


def test_torchvision_shorthand(tmp_path, monkeypatch):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    seeded = cache_path(url, tmp_path)
    seeded.parent.mkdir(parents=True)
    torch.save(torchvision_state_dict(seed=5), seeded)
    requested = []

    def offline(request, *args, **kwargs):
        requested.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    variables = load_weights("torchvision:resnet18.IMAGENET1K_V1", "resnet18",
                             cache_dir=tmp_path)
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"],
                                  torchvision_state_dict(seed=5)["fc.bias"])
    assert requested == []

    with pytest.raises(WeightsError, match="could not download https://download.pytorch.org/"
                                           "models/resnet50-11ad3fa6.pth"):
        load_weights("torchvision:resnet50.IMAGENET1K_V2", "resnet50", cache_dir=tmp_path)
    assert requested == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url]


def test_torchvision_shorthand_errors():
    with pytest.raises(WeightsError, match="holds resnet50 weights, not resnet18: "
                                           "pass arch='resnet50'"):
        load_weights("torchvision:resnet50.IMAGENET1K_V2", "resnet18")
    with pytest.raises(WeightsError, match="IMAGENET1K_V1, DEFAULT"):
        load_weights("torchvision:resnet18.IMAGENET1K_V2", "resnet18")
    with pytest.raises(WeightsError, match="unknown architecture 'vgg16'"):
        load_weights("torchvision:vgg16.IMAGENET1K_V1", "resnet18")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_torch_state_dict_loads_strictly_into_torchvision(resnet18_pth, num_classes):
    variables = load_weights(resnet18_pth, "resnet18", num_classes=num_classes, rng=0)
    state_dict = to_torch_state_dict(variables)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    original = torchvision_state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("fc.") and num_classes != 1000:
            continue
        if key.endswith("num_batches_tracked"):
            assert value.item() == 0 and value.dtype == torch.int64
        else:
            assert torch.equal(value, original[key]), key


def test_save_torch_state_dict_files_load_in_torchvision(resnet18_pth, tmp_path):
    variables = load_weights(resnet18_pth, "resnet18")
    original = torchvision_state_dict()
    for name in ("out.safetensors", "out.pth"):
        path = save_torch_state_dict(variables, tmp_path / "export" / name)
        if name.endswith(".pth"):
            loaded = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file

            loaded = load_file(path)
        model = torchvision.models.resnet18()
        model.load_state_dict(loaded, strict=True)
        for key, value in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(value, original[key]), key
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["out.pth",
                                                                        "out.safetensors"]
    with pytest.raises(WeightsError, match=r"use a \.safetensors or \.pth"):
        save_torch_state_dict(variables, tmp_path / "out.npz")


def test_export_refuses_replicated_or_foreign_variables(resnet18_pth):
    variables = load_weights(resnet18_pth, "resnet18")
    replicated = jax.tree.map(lambda x: jnp.stack([x, x]), variables)
    with pytest.raises(WeightsError, match="pass unreplicated variables"):
        to_torch_state_dict(replicated)
    with pytest.raises(WeightsError, match="expected ResNet variables"):
        to_torch_state_dict(variables["params"])
    del variables["params"]["layer4_1"]
    with pytest.raises(WeightsError, match="not those of a jaxsft ResNet"):
        to_torch_state_dict(variables)
