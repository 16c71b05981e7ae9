"""Pretrained weights in and out: torchvision/timm state dicts <-> Flax variables.

`load_weights` reads a `.pth`/`.pt`/`.bin` file (through torch), a `.safetensors` file (no
torch needed), an `https://`/`file://` URL (downloaded once into a cache, hash checked), the
shorthand `torchvision:<arch>.<WEIGHTS>`, or a directory written by `python -m jaxsft.convert`.
The mapping is strict: every tensor of the file must land in the model and every model
variable must come from the file, with its shape checked; only `num_batches_tracked` is
dropped. torchvision and timm ResNets share key names, so one mapping serves both:

    torch key                       Flax variable                          transform
    conv1.weight   (O, I, kh, kw)   params/conv1/kernel (kh, kw, I, O)     transpose(2, 3, 1, 0)
    bn1.weight / bn1.bias           params/bn1/scale / bias                none
    bn1.running_mean / running_var  batch_stats/bn1/mean / var             none
    layer1.0.downsample.1.*         .../layer1_0/downsample_1/*            "a.0" <-> "a_0"
    fc.weight (out, in)             params/fc/kernel (in, out)             transpose
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import ARCHITECTURES, create_model, list_models
from jaxsft.models.resnet import BasicBlock, classifier
from jaxsft.workdir import CHECKPOINT_DIR

__all__ = [
    "TORCHVISION_WEIGHTS",
    "WeightsError",
    "cache_path",
    "default_cache_dir",
    "fetch",
    "file_sha256",
    "from_torch_state_dict",
    "infer_arch",
    "load_weights",
    "read_converted_metadata",
    "read_state_dict",
    "resolve_source",
    "save_torch_state_dict",
    "temp_sibling",
    "to_torch_state_dict",
    "torchvision_url",
]

METADATA_FILE = "jaxsft_weights.json"  # beside the Orbax checkpoint in a converted directory
VARIABLES_DIR = "variables"  # the Orbax checkpoint inside a converted directory
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
URL_SCHEMES = ("https", "http", "file")
HEAD_INITS = ("default", "zeros")  # how a replaced head starts
# torch.hub's convention: "resnet50-11ad3fa6.pth" holds a file whose sha256 starts 11ad3fa6.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

_BASE = "https://download.pytorch.org/models/"
# Copied from torchvision/models/resnet.py (torchvision 0.29); DEFAULT as torchvision defines it.
TORCHVISION_WEIGHTS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    arch: MappingProxyType({**urls, "DEFAULT": urls[default]})
    for arch, default, urls in [
        ("resnet18", "IMAGENET1K_V1", {"IMAGENET1K_V1": _BASE + "resnet18-f37072fd.pth"}),
        ("resnet34", "IMAGENET1K_V1", {"IMAGENET1K_V1": _BASE + "resnet34-b627a593.pth"}),
        ("resnet50", "IMAGENET1K_V2", {"IMAGENET1K_V1": _BASE + "resnet50-0676ba61.pth",
                                       "IMAGENET1K_V2": _BASE + "resnet50-11ad3fa6.pth"}),
        ("resnet101", "IMAGENET1K_V2", {"IMAGENET1K_V1": _BASE + "resnet101-63fe2227.pth",
                                        "IMAGENET1K_V2": _BASE + "resnet101-cd907fc2.pth"}),
        ("resnet152", "IMAGENET1K_V2", {"IMAGENET1K_V1": _BASE + "resnet152-394f9c45.pth",
                                        "IMAGENET1K_V2": _BASE + "resnet152-f82ba261.pth"}),
        ("resnext50_32x4d", "IMAGENET1K_V2", {
            "IMAGENET1K_V1": _BASE + "resnext50_32x4d-7cdf4587.pth",
            "IMAGENET1K_V2": _BASE + "resnext50_32x4d-1a0047aa.pth"}),
        ("resnext101_32x8d", "IMAGENET1K_V2", {
            "IMAGENET1K_V1": _BASE + "resnext101_32x8d-8ba56ff5.pth",
            "IMAGENET1K_V2": _BASE + "resnext101_32x8d-110c445d.pth"}),
        ("resnext101_64x4d", "IMAGENET1K_V1", {
            "IMAGENET1K_V1": _BASE + "resnext101_64x4d-173b62eb.pth"}),
        ("wide_resnet50_2", "IMAGENET1K_V2", {
            "IMAGENET1K_V1": _BASE + "wide_resnet50_2-95faca4d.pth",
            "IMAGENET1K_V2": _BASE + "wide_resnet50_2-9ba9bcbe.pth"}),
        ("wide_resnet101_2", "IMAGENET1K_V2", {
            "IMAGENET1K_V1": _BASE + "wide_resnet101_2-32ee1156.pth",
            "IMAGENET1K_V2": _BASE + "wide_resnet101_2-d733dc28.pth"}),
    ]
})

_SOURCES_HELP = ("a .pth/.pt/.bin/.safetensors file, a directory written by python -m "
                 "jaxsft.convert, a jaxsft workdir (its best checkpoint), an https:// or "
                 "file:// URL, or torchvision:<arch>.<WEIGHTS> (e.g. "
                 "torchvision:resnet50.IMAGENET1K_V2)")


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message names the fix.

    `cli_message`, where set, says the same in the command line's words (flags, not
    arguments): what `python -m jaxsft.X` prints.
    """

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message


def _wrong_arch(origin: object, held: str, arch: str) -> WeightsError:
    """The file holds another architecture: the library's fix and the command line's."""
    what = f"{origin} holds {held} weights, not {arch}"
    return WeightsError(f"{what}: pass arch='{held}'", cli_message=f"{what}: pass --model {held}")


# ----------------------------------------------------------------------------- public API


def load_weights(source: str | os.PathLike, arch: str, num_classes: int | None = None,
                 rng: Any = None, *, cache_dir: str | os.PathLike | None = None,
                 dtype: Any = None, sha256: str | None = None,
                 head_init: str | Callable = "default", new_head: bool = False) -> dict[str, Any]:
    """Pretrained `{"params", "batch_stats"}` for `create_model(arch, num_classes)`.

    `source`: a state-dict file (.pth/.pt/.bin via torch, .safetensors without it), a
    directory from `python -m jaxsft.convert`, a jaxsft workdir (the weights of its best
    checkpoint, the moving average's if it kept one), an https:// or file:// URL (cached in
    `cache_dir`, default $JAXSFT_CACHE or ~/.cache/jaxsft), or `torchvision:<arch>.<WEIGHTS>`.
    `num_classes`: None or the file's class count keeps the pretrained head; another count
    re-initialises the head from `rng` (a JAX key or an int seed) as torch.nn.Linear does.
    `dtype`: None keeps the file's float dtype where JAX can (float64 only under x64;
    half precision becomes float32). `sha256`: the expected hash of a downloaded file.
    `head_init`: how a replaced head starts, "default" (torch.nn.Linear's uniform, from `rng`)
    or "zeros" (BiT, Kolesnikov et al., ECCV 2020: zero kernel and bias; no rng needed), or
    a function of the variables (backbone loaded, head zero) returning the head's params
    (`jaxsft.imprint.imprinter`: class means of the training set's features).
    `new_head`: replace the head even when the class counts agree (a new task with as many
    classes as the file's).
    """
    _check_arch(arch)
    path = resolve_source(source, arch, cache_dir=cache_dir, sha256=sha256)
    if (path / CHECKPOINT_DIR).is_dir():
        state_dict = _read_workdir(path, arch)
    elif path.is_dir():
        state_dict = _read_converted(path, arch)
    else:
        state_dict = read_state_dict(path)
    return from_torch_state_dict(state_dict, arch, num_classes, rng, dtype=dtype,
                                 origin=str(source), head_init=head_init, new_head=new_head)


def from_torch_state_dict(state_dict: Mapping[str, Any], arch: str,
                          num_classes: int | None = None, rng: Any = None, *,
                          dtype: Any = None, origin: str = "the state dict",
                          head_init: str | Callable = "default",
                          new_head: bool = False) -> dict[str, Any]:
    """The strict torch -> Flax mapping behind `load_weights`, for an in-memory state dict."""
    _check_arch(arch)
    if not callable(head_init) and head_init not in HEAD_INITS:
        raise WeightsError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    if new_head and num_classes is None:
        raise WeightsError("new_head replaces the head with one of num_classes: pass num_classes")
    sd = {k: _to_numpy(v, k, origin) for k, v in _unwrap(state_dict, origin).items()
          if not k.endswith("num_batches_tracked")}
    file_classes = _file_classes(sd)
    layout = _layout(arch, file_classes or 1000)
    fan_in = layout["fc.weight"].shape[1]
    if file_classes is None:  # a headless backbone: the head must be initialised
        layout = {k: v for k, v in layout.items() if not k.startswith("fc.")}
    _check_tensors(sd, layout, arch, origin)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, slot in layout.items():
        value = _from_torch(sd[key], slot.kind)
        # A copy: on the CPU, jnp.asarray may alias the buffer of a torch tensor, which
        # torch then updates in place (running statistics in train mode).
        _set(variables[slot.collection], slot.path, jnp.array(value, _jax_dtype(value.dtype, dtype),
                                                    copy=True))
    if num_classes is not None or file_classes is None:
        _replace_head(variables, fan_in, None if new_head else file_classes, num_classes, rng,
                      origin, head_init)
    return variables


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision's state dict (key names, layouts) for jaxsft ResNet variables.

    Includes `num_batches_tracked` (zeros), so torchvision's `load_state_dict(strict=True)`
    accepts it: `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
    """
    if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
        raise WeightsError("expected ResNet variables {'params': ..., 'batch_stats': ...}")
    out = _torch_tensors(variables)
    _check_export(out)
    return out


def save_torch_state_dict(variables: Mapping[str, Any], path: str | os.PathLike,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write `to_torch_state_dict(variables)` as .safetensors (no torch needed) or .pth/.pt/.bin.

    `metadata` (text) goes into a .safetensors header, beside the tensors (`read_metadata`);
    a torch file holds the bare state dict. The file appears whole or not at all (written to
    a temporary file, then renamed).
    """
    path = Path(path)
    state_dict = to_torch_state_dict(variables)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        def write(tmp: str) -> None:
            save_file(state_dict, tmp, metadata=dict(metadata or {}))
    elif path.suffix in TORCH_SUFFIXES:
        torch = _import_torch(path, "write a .safetensors file instead")

        def write(tmp: str) -> None:
            torch.save({k: _numpy_to_torch(torch, v) for k, v in state_dict.items()}, tmp)
    else:
        raise WeightsError(f"cannot write {path}: use a .safetensors or .pth file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a .safetensors header ({} for any other file, or none written)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def resolve_source(source: str | os.PathLike, arch: str, *,
                   cache_dir: str | os.PathLike | None = None,
                   sha256: str | None = None) -> Path:
    """The local file or directory behind `source`, downloading URLs into the cache."""
    text = os.fspath(source)
    if Path(text).exists():
        return Path(text)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", text)
    if scheme is None:
        raise WeightsError(f"weights file {text} does not exist; pass {_SOURCES_HELP}")
    name = scheme.group(1).lower()
    if name == "torchvision":
        spec = text[len("torchvision:"):]
        url = torchvision_url(spec)
        held = spec.partition(".")[0]
        if held != arch:
            raise _wrong_arch(text, held, arch)
        return fetch(url, cache_dir=cache_dir, sha256=sha256)
    if name in URL_SCHEMES and text[len(name):].startswith("://"):
        return fetch(text, cache_dir=cache_dir, sha256=sha256)
    raise WeightsError(f"unknown weights source scheme {name + ':'!r} in {text}; pass "
                       f"{_SOURCES_HELP}")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state-dict file as numpy arrays: .safetensors directly, .pth/.pt/.bin through torch.

    Unwraps a {"state_dict": ...} or {"model": ...} checkpoint and strips DDP's "module."
    prefix, so timm and torchvision training checkpoints load as their plain state dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass {_SOURCES_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError on bad headers
            raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    elif path.suffix in TORCH_SUFFIXES:
        raw = _torch_load(path)
    else:
        raise WeightsError(f"unknown weight file type {path.suffix!r} ({path}); pass "
                           f"{_SOURCES_HELP}")
    state_dict = _unwrap(raw, str(path))
    return {k: _to_numpy(v, k, str(path)) for k, v in state_dict.items()}


def infer_arch(state_dict: Mapping[str, Any]) -> str | None:
    """The architecture a torchvision-style ResNet state dict holds, or None if none fits.

    Read from the keys and shapes: blocks per stage, bottleneck (conv3) or basic blocks, and
    the first bottleneck's 3x3 conv (width and groups separate ResNet, wide and ResNeXt).
    """
    signature = _signature(state_dict)
    if signature is None:
        return None
    for name in list_models():
        spec = ARCHITECTURES[name]
        basic = spec["block"] is BasicBlock
        want = (tuple(spec["layers"]), basic,
                1 if basic else spec.get("groups", 1),
                64 if basic else spec.get("width_per_group", 64))
        if want == signature:
            return name
    return None


def torchvision_url(spec: str) -> str:
    """torchvision's published URL for "<arch>.<WEIGHTS>" (the part after "torchvision:")."""
    arch, _, enum = spec.partition(".")
    if arch not in TORCHVISION_WEIGHTS:
        raise WeightsError(f"torchvision:{spec}: unknown architecture {arch!r}; torchvision "
                           f"publishes weights for {', '.join(sorted(TORCHVISION_WEIGHTS))}")
    enums = TORCHVISION_WEIGHTS[arch]
    if enum not in enums:
        raise WeightsError(f"torchvision:{spec}: unknown weights {enum!r} for {arch}; use "
                           f"torchvision:{arch}.<WEIGHTS> with WEIGHTS one of "
                           f"{', '.join(enums)}")
    return enums[enum]


def default_cache_dir() -> Path:
    """$JAXSFT_CACHE, else ~/.cache/jaxsft."""
    return Path(os.environ.get("JAXSFT_CACHE") or Path.home() / ".cache" / "jaxsft")


def cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch` keeps `url`: <cache>/<sha256(url)[:16]>/<file name>.

    The file name is kept (it carries torchvision's hash prefix and the suffix that selects
    the reader); the URL digest keeps two URLs with the same file name apart.
    """
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise WeightsError(f"{url} names no file; pass the URL of a weights file")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / digest / name


def fetch(url: str, *, cache_dir: str | os.PathLike | None = None,
          sha256: str | None = None) -> Path:
    """Download `url` once into the cache and return the local path.

    The download goes to a temporary file beside its destination and is renamed into place
    only after its hash is verified: against `sha256` when given, else against the hash
    prefix in the file name, as torch.hub's check_hash does. A cached file is trusted (it
    was verified before it was renamed into place).
    """
    path = cache_path(url, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as out:
            digest = _download(url, out)
        _verify_hash(url, path.name, digest, sha256)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`, to write to and then rename over `path` atomically.

    (Same directory, so the rename never crosses file systems; the umask applies, unlike
    tempfile's private 0600 files.)
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_converted_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a directory written by `python -m jaxsft.convert`."""
    meta_path = Path(path) / METADATA_FILE
    if not meta_path.is_file():
        raise WeightsError(f"directory {path} holds no {METADATA_FILE}: it was not written by "
                           f"python -m jaxsft.convert; pass {_SOURCES_HELP}")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta.get("arch"), str):
            raise ValueError("no 'arch' entry")
    except ValueError as e:
        raise WeightsError(f"{meta_path} is corrupt ({e}); convert the weights again") from e
    return meta


# ----------------------------------------------------------------------------- downloads


def _download(url: str, out: Any) -> str:
    """Stream `url` into the open file `out`; return the hex sha256 of what was written."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"could not download {url}: {reason}; check the address and the "
                           "network, or download the file yourself and pass its path") from e
    return h.hexdigest()


def _verify_hash(url: str, name: str, digest: str, sha256: str | None) -> None:
    if sha256 is not None:
        if digest != sha256.strip().lower():
            raise WeightsError(f"{url}: sha256 {digest} does not match the expected "
                               f"{sha256}; the download is corrupt or the URL or hash is wrong "
                               "(nothing was cached)")
        return
    match = HASH_REGEX.search(name)
    prefix = match.group(1) if match else ""
    if prefix and not digest.startswith(prefix):
        raise WeightsError(f"{url}: sha256 {digest} does not start with {prefix!r}, the hash "
                           "prefix in the file name (torch.hub convention); the download is "
                           "corrupt or the URL is wrong (nothing was cached). If the name "
                           "carries no hash, pass sha256= with the file's real hash")


def _read_workdir(path: Path, arch: str) -> dict[str, np.ndarray]:
    """The state dict of a jaxsft workdir's best checkpoint, after checking its architecture."""
    from jaxsft.checkpoint import CheckpointError, restore_variables

    try:
        variables, meta = restore_variables(path / CHECKPOINT_DIR, "best")
    except CheckpointError as e:
        raise WeightsError(f"cannot use the workdir {path} as weights: {e}") from None
    held = meta.get("config", {}).get("model", {}).get("model")
    if held is not None and held != arch:
        raise WeightsError(f"{path} holds {held} weights, not {arch}: pass arch='{held}'")
    return _torch_tensors(variables)  # load_weights checks them


def _read_converted(path: Path, arch: str) -> dict[str, np.ndarray]:
    """The state dict of a converted directory, after checking its architecture."""
    meta = read_converted_metadata(path)
    if meta["arch"] != arch:
        raise _wrong_arch(path, meta["arch"], arch)
    import orbax.checkpoint as ocp

    ckpt = (path / VARIABLES_DIR).absolute()
    device = jax.local_devices(backend="cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(ckpt).item_metadata.tree
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
            variables = checkpointer.restore(ckpt, target)
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"cannot read the checkpoint in {path} ({e}); convert the weights "
                           "again") from e
    return _torch_tensors(variables)  # load_weights checks them


# ----------------------------------------------------------------------------- file reading


def _import_torch(path: Path, alternative: str = "convert the file to .safetensors") -> Any:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{path} is a PyTorch file and PyTorch is not installed: "
                           f"pip install jaxsft[torch], or {alternative}") from e
    return torch


def _torch_load(path: Path) -> Any:
    torch = _import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {first}. "
                           "Save a plain state dict (torch.save(model.state_dict(), path)) "
                           "from code you trust") from e


def _unwrap(obj: Any, origin: str) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint, with DDP's "module." prefix removed."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a state dict "
                           "(a mapping from names to tensors)")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _to_numpy(value: Any, key: str, origin: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16 for torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, jax.Array):
        return np.asarray(value)
    raise WeightsError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                       "pass a plain state dict")


def _numpy_to_torch(torch: Any, value: np.ndarray) -> Any:
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(value)


# ----------------------------------------------------------------------------- mapping


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture {arch!r}; known: {', '.join(list_models())}")


def _torch_name(path: tuple[str, ...]) -> str:
    """("layer1_0", "downsample_1") -> "layer1.0.downsample.1"."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


class _Slot(NamedTuple):
    """Where one torch tensor goes in the Flax variables, and how."""

    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # module names, then the leaf name
    kind: str  # "conv" (OIHW <-> HWIO), "dense" (transpose) or "copy"
    shape: tuple[int, ...]  # torch's shape


_TORCH_LEAF = MappingProxyType({"kernel": "weight", "scale": "weight", "bias": "bias",
                                "mean": "running_mean", "var": "running_var"})


def _layout(arch: str, num_classes: int) -> dict[str, _Slot]:
    """torch key -> (collection, Flax path, kind, torch shape) for every model variable."""
    model = create_model(arch, num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    layout = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            names = tuple(p.key for p in path)
            module, leaf_name = names[:-1], names[-1]
            torch_leaf = _TORCH_LEAF[leaf_name]
            kind = {4: "conv", 2: "dense"}[leaf.ndim] if leaf_name == "kernel" else "copy"
            key = f"{_torch_name(module)}.{torch_leaf}"
            layout[key] = _Slot(collection, names, kind, _torch_shape(leaf.shape, kind))
    return layout


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "dense":
        return shape[::-1]
    return tuple(shape)


def _from_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "dense":  # (out, in) -> (in, out)
        return value.T
    return value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _jax_dtype(file_dtype: np.dtype, dtype: Any) -> Any:
    """The dtype a loaded tensor gets: `dtype` if given, else the file's as far as JAX allows."""
    if dtype is not None:
        want = jnp.dtype(dtype)
        if jax.dtypes.canonicalize_dtype(want) != want:
            raise WeightsError(f"dtype={want.name} needs JAX's x64 mode: "
                               "jax.config.update('jax_enable_x64', True) before loading")
        return want
    if not np.issubdtype(file_dtype, np.floating) and file_dtype.name != "bfloat16":
        return jnp.float32
    if jnp.dtype(file_dtype).itemsize < 4:  # float16/bfloat16 files: compute casts them
        return jnp.float32
    return jax.dtypes.canonicalize_dtype(file_dtype)


def _file_classes(sd: Mapping[str, np.ndarray]) -> int | None:
    """Classes of the file's head, from fc.weight; None for a file with no head at all."""
    weight, bias = sd.get("fc.weight"), sd.get("fc.bias")
    if weight is None and bias is None:
        return None
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    if bias is not None and bias.ndim == 1:
        return int(bias.shape[0])
    return 1000  # a malformed head: the shape check names it


def _check_tensors(sd: Mapping[str, np.ndarray], layout: Mapping[str, _Slot], arch: str,
                   origin: str) -> None:
    """Raise one WeightsError naming the first unexplained tensor, or the file's real arch."""
    held = infer_arch(sd)
    if held is not None and held != arch:
        raise _wrong_arch(origin, held, arch)
    missing = [k for k in layout if k not in sd]
    unexpected = [k for k in sd if k not in layout]
    misshapen = [k for k in layout if k in sd and tuple(sd[k].shape) != layout[k].shape]
    if not (missing or unexpected or misshapen):
        return
    problems = []
    if missing:
        problems.append(f"missing tensor {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor {_names(unexpected)}")
    if misshapen:
        k = misshapen[0]
        problems.append(f"tensor {k!r} has shape {tuple(sd[k].shape)}, {arch} needs "
                        f"{layout[k].shape}" + (f" (and {len(misshapen) - 1} more misshapen)"
                                              if len(misshapen) > 1 else ""))
    raise WeightsError(f"{origin} does not fit {arch}: {'; '.join(problems)}. "
                       f"{_held_description(sd)}")


def _names(keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"


def _held_description(sd: Mapping[str, np.ndarray]) -> str:
    held = infer_arch(sd)
    if held is not None:
        return f"The file holds {held} weights, damaged or edited; use an intact file."
    signature = _signature(sd)
    if signature is None:
        return ("The file does not look like a torchvision/timm ResNet state dict; pass the "
                "weights of a ResNet, wide ResNet or ResNeXt.")
    layers, basic, groups, width = signature
    kind = "basic" if basic else f"bottleneck (groups {groups}, width per group {width})"
    return (f"The file holds a ResNet with {kind} blocks {layers}, which is none of "
            f"{', '.join(list_models())}.")


def _signature(sd: Mapping[str, Any]) -> tuple[tuple[int, ...], bool, int, int] | None:
    """(blocks per stage, basic?, groups, width per group) of a ResNet state dict, or None."""
    blocks = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in sd
                 if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not found:
            return None
        blocks.append(max(found) + 1)
    basic = not any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in sd)
    if basic:
        return tuple(blocks), True, 1, 64
    conv2 = sd.get("layer1.0.conv2.weight")
    if conv2 is None or len(conv2.shape) != 4 or conv2.shape[1] == 0:
        return None
    width, per_group = int(conv2.shape[0]), int(conv2.shape[1])
    groups = width // per_group
    return tuple(blocks), False, groups, width // groups


def _replace_head(variables: dict, fan_in: int, file_classes: int | None,
                  num_classes: int | None, rng: Any, origin: str,
                  head_init: str | Callable) -> None:
    """Keep the file's head if the class counts agree, else initialise a new one from rng."""
    if num_classes is None:
        raise WeightsError(f"{origin} has no classifier head (fc.weight, fc.bias): pass "
                           "num_classes and rng to initialise one")
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1):
        raise WeightsError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes == file_classes:
        return
    params = variables["params"]
    dtype = params["conv1"]["kernel"].dtype
    if head_init == "zeros" or callable(head_init):
        params["fc"] = {"kernel": jnp.zeros((fan_in, num_classes), dtype),
                        "bias": jnp.zeros((num_classes,), dtype)}
        if callable(head_init):  # computed from the loaded backbone (jaxsft.imprint)
            params["fc"] = head_init(variables)
        return
    if rng is None:
        raise WeightsError(f"{origin} has a {file_classes}-class head; re-initialising it for "
                           f"{num_classes} classes needs rng, e.g. rng=jax.random.key(0)")
    if isinstance(rng, numbers.Integral):
        rng = jax.random.key(int(rng))
    head = classifier(num_classes, fan_in, dtype)
    new = head.init(rng, jnp.zeros((1, fan_in), dtype))["params"]
    params["fc"] = jax.tree.map(lambda x: x.astype(dtype), new)


def _check_export(sd: Mapping[str, np.ndarray]) -> None:
    """Exported tensors must form a known architecture, every shape as torchvision's."""
    held = infer_arch(sd)
    if held is None or "fc.weight" not in sd:
        raise WeightsError(f"these variables are not those of a jaxsft ResNet. "
                           f"{_held_description(sd)}")
    tensors = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    _check_tensors(tensors, _layout(held, sd["fc.weight"].shape[0]), held, "the variables")


def _torch_tensors(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    _walk_modules(variables["params"], variables["batch_stats"], (), out)
    return out


def _walk_modules(params: Mapping[str, Any], stats: Mapping[str, Any],
                  path: tuple[str, ...], out: dict[str, np.ndarray]) -> None:
    """Flax module tree -> torch keys, recursively; BatchNorm modules carry their stats."""
    name = _torch_name(path)
    if "scale" in params:  # BatchNorm
        if not {"mean", "var"} <= set(stats):
            raise WeightsError(f"BatchNorm {'/'.join(path)} has no running statistics; pass "
                               "{'params': ..., 'batch_stats': ...} of a jaxsft ResNet")
        for leaf, value in (("weight", params["scale"]), ("bias", params["bias"]),
                            ("running_mean", stats["mean"]), ("running_var", stats["var"])):
            out[f"{name}.{leaf}"] = _np(value, (1,), path)
        out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    elif "kernel" in params:
        kernel = _np(params["kernel"], (2, 4), path)
        out[f"{name}.weight"] = np.ascontiguousarray(
            np.transpose(kernel, (3, 2, 0, 1)) if kernel.ndim == 4 else kernel.T)
        if "bias" in params:
            out[f"{name}.bias"] = _np(params["bias"], (1,), path)
    else:
        for key, sub in params.items():
            if not isinstance(sub, Mapping):
                raise WeightsError(f"unexpected variable {'/'.join((*path, key))}; pass "
                                   "{'params': ..., 'batch_stats': ...} of a jaxsft ResNet")
            _walk_modules(sub, stats.get(key, {}), (*path, key), out)


def _np(x: Any, ndims: tuple[int, ...], path: tuple[str, ...]) -> np.ndarray:
    """A copy as numpy, with the rank a ResNet variable has (a pmap-replicated one has +1)."""
    value = np.array(x, copy=True)
    if value.ndim not in ndims:
        raise WeightsError(f"variable {'/'.join(path)} has shape {value.shape}, not those of a "
                           "jaxsft ResNet; after pmap, pass unreplicated variables "
                           "(jaxsft.steps.unreplicate)")
    return value
