"""Load any encoder to evaluate: our checkpoints, timm 2D models, MONAI networks or any PyTorch factory.

`load_any_encoder(spec, weights=..., options=...)` returns `(module, info)`; the module honours the encoder
contract of `rafmedia.engine.encoders.base` (`forward(x_BCDHW) -> (B, embed_dim)`, an int `embed_dim`). Specs:

- `path/encoder.safetensors` (or `rafmedia:path`): an exported encoder with its `.card.json` (`load_encoder`), or
  a folder in the Hugging Face layout of `raf export --hf` (its config.json is the card);
- `timm:NAME` + weights: a timm 2D model (`timm.create_model(NAME, pretrained=False, num_classes=0, in_chans=...)`)
  run per slice through the `timm2d_slices` adapter (options `axis`, `neighbours`, `in_channels`; others go to
  timm); a classifier in the weights file (timm's `pretrained_cfg["classifier"]`) is dropped and reported;
- `monai:NAME` + options + weights: `monai.networks.nets.NAME(**options)`, e.g. `monai:resnet18` with
  `{"spatial_dims": 3, "n_input_channels": 1, "feed_forward": False}`;
- `package.module:factory` (or `module:package.module:factory`): `factory(**options)` must return an `nn.Module`.

Options the loader itself consumes (never passed to a factory): `input_shape` ([C, D, H, W] of the one dummy
forward that checks the output and infers `embed_dim`; default: the first layer's input channels at 32^3),
`output_index` (which element of a tuple/list/dict output is the embedding or feature map; default 0),
`feature_pool` ("mean" or "max" over a feature map's spatial axes or a token sequence) and `state_dict_key`
(which entry of a checkpoint dict holds the weights, e.g. "teacher").

Weights are read only with `safetensors.torch.load_file` or `torch.load(weights_only=True)`: a file holding
pickled Python objects (a whole saved module, or anything that would run code when unpickled) is refused.
A module built without weights is initialised under `torch.manual_seed(0)`, so its digest names one module.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks import nets
from safetensors.torch import load_file
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, did_you_mean, unknown_name_error
from rafmedia.engine.encoders.transformers import Timm2dSlices
from rafmedia.engine.export import export_files, is_hf_export, load_encoder

LOADER_OPTIONS = ("input_shape", "output_index", "feature_pool", "state_dict_key")
FEATURE_POOLS = ("mean", "max")
COMMON_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.", "net.", "network.", "trunk.")
CHECKPOINT_ENTRIES = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)  # BatchNorm counters: unused in eval; old checkpoints lack them
DEFAULT_SPATIAL = (32, 32, 32)
INIT_SEED = 0
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class BuiltEncoder:
    """What an encoder source builds: the module, where a weights file goes, and keys the file may carry extra."""

    module: nn.Module
    weights_into: nn.Module | None  # None: the source read its own weights (our checkpoints)
    ignored_prefixes: tuple[str, ...] = ()  # e.g. timm's classifier, absent with num_classes=0
    info: dict[str, Any] = field(default_factory=dict)
    digest_files: tuple[Path, ...] = ()  # files besides the weights that define the module (a model card)


ENCODER_SOURCES: Registry[Callable[..., BuiltEncoder]] = Registry("encoder source")


def list_encoder_sources() -> list[str]:
    return ENCODER_SOURCES.names()


def load_any_encoder(spec: str, *, weights: str | None = None,
                     options: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the encoder `spec` names, loads `weights` safely and makes it honour the encoder contract.

    Args:
        spec: a `.safetensors` export, `timm:NAME`, `monai:NAME` or `package.module:factory` (module docstring).
        weights: a `.safetensors` or `torch.save`d state-dict file (not for our exports: their spec is the file).
        options: factory options plus the loader's own (`LOADER_OPTIONS`).

    Returns:
        `(module, info)`: the module in eval mode, and `info` with `source`, `spec`, `weights`, `embed_dim`,
        `digest` (16 hex digits of sha256 over the weights bytes, the spec, the options and the model card or the
        factory's source file), `adapter`, `stripped_prefix`, `dropped_keys` and `state_dict_key`.
    """
    options = dict(options or {})
    loader = {key: options.pop(key) for key in LOADER_OPTIONS if key in options}
    source, target = parse_spec(spec)
    if source == "rafmedia":
        if weights is not None and Path(weights) != Path(target):
            raise UserError(f"'{spec}' is an exported encoder and carries its own weights; drop weights={weights!r}")
        weights = export_files(target)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)  # a module built without weights is the same module every time
        built = ENCODER_SOURCES.get(source)(target, options=options)
    info = {"source": source, "spec": spec, "weights": None if weights is None else str(weights),
            "options": options, "stripped_prefix": "", "dropped_keys": [], "state_dict_key": None, **built.info}
    if built.weights_into is not None and weights is not None:
        state, info["state_dict_key"] = read_state_dict(weights, entry=loader.get("state_dict_key"))
        state, info["stripped_prefix"], info["dropped_keys"] = fit_state_dict(
            state, built.weights_into.state_dict(), ignored_prefixes=built.ignored_prefixes, source=str(weights))
        built.weights_into.load_state_dict(state, strict=False)  # fit_state_dict checked every key and shape
    elif weights is None:
        info["random_init_seed"] = INIT_SEED
    contract = {key: value for key, value in loader.items() if key != "state_dict_key"}
    module, info["adapter"] = conform_to_contract(built.module.eval(), **contract)
    info["embed_dim"] = int(module.embed_dim)
    # An export is identified by its bytes (and card), not by where it lies; other specs also by their name.
    identity = "rafmedia" if source == "rafmedia" else f"{source}:{target}"
    info["digest"] = encoder_digest(identity, options={**options, **loader}, weights=weights,
                                    extra_files=built.digest_files)
    return module.eval(), info


def parse_spec(spec: str) -> tuple[str, str]:
    """Splits a spec into (source, target): `timm:resnet18` -> ("timm", "resnet18"), a path -> ("rafmedia", path)."""
    spec = str(spec)
    prefix, _, rest = spec.partition(":")
    if rest and prefix in ENCODER_SOURCES:
        return prefix, rest
    if spec.endswith(".safetensors") or is_hf_export(spec):
        return "rafmedia", spec
    if _IMPORT_PATH.match(spec):
        return "module", spec
    hint = did_you_mean(prefix, ENCODER_SOURCES.names()) if rest else ""
    raise UserError(f"encoder spec '{spec}' is not one of: a path to an exported '.safetensors' encoder (or its "
                    "`raf export --hf` folder), 'timm:NAME', "
                    f"'monai:NAME' or 'package.module:factory';{hint} (sources: {', '.join(list_encoder_sources())})")


# ---- sources ------------------------------------------------------------------------------------------
@ENCODER_SOURCES.register("rafmedia")
def create_rafmedia_source(target: str, *, options: dict) -> BuiltEncoder:
    """An encoder exported by `raf pretrain`: safetensors weights plus the model card naming its architecture."""
    if options:
        warnings.warn(f"options {sorted(options)} are ignored for the exported encoder {target}: its model card "
                      "fixes the architecture", stacklevel=3)
    encoder, card = load_encoder(target)
    return BuiltEncoder(encoder, weights_into=None, info={"architecture": card.get("architecture")},
                        digest_files=(export_files(target)[1],))


@ENCODER_SOURCES.register("timm")
def create_timm_source(target: str, *, options: dict) -> BuiltEncoder:
    """A timm 2D model applied to every slice through the project's `timm2d_slices` adapter (`Timm2dSlices`)."""
    options = dict(options)
    if "in_chans" in options:  # timm's name for it; the adapter multiplies it by 2 * neighbours + 1 itself
        options.setdefault("in_channels", options.pop("in_chans"))
    slicing = {key: options.pop(key) for key in ("in_channels", "axis", "neighbours") if key in options}
    try:
        adapter = Timm2dSlices(backbone=target, pretrained=False, **slicing, **options)
    except TypeError as error:  # an option timm's model does not take, or one the adapter sets itself
        raise UserError(f"building 'timm:{target}' with options {options} failed: {error} (the adapter sets "
                        "pretrained=False, num_classes=0 and in_chans itself)") from error
    classifier = adapter.backbone.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return BuiltEncoder(adapter, weights_into=adapter.backbone, ignored_prefixes=tuple(f"{c}." for c in classifiers),
                        info={"architecture": f"timm2d_slices({target})"})


@ENCODER_SOURCES.register("monai")
def create_monai_source(target: str, *, options: dict) -> BuiltEncoder:
    """A network of `monai.networks.nets` by class or function name, called with `options`."""
    names = [name for name in dir(nets) if not name.startswith("_") and callable(getattr(nets, name))]
    if target not in names:
        raise unknown_name_error("MONAI network", target, names)
    module = _call_factory(getattr(nets, target), options, what=f"monai:{target}")
    return BuiltEncoder(module, weights_into=module, info={"architecture": f"monai.networks.nets.{target}"})


@ENCODER_SOURCES.register("module")
def create_module_source(target: str, *, options: dict) -> BuiltEncoder:
    """Any factory by import path, `package.module:factory` (a class or a function returning an `nn.Module`)."""
    if not _IMPORT_PATH.match(target):
        raise UserError(f"'{target}' is not an import path; write it as 'package.module:factory'")
    module_name, attribute = target.split(":")
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as error:
        source_hint = did_you_mean(module_name, ENCODER_SOURCES.names()).replace("?", " (an encoder source)?")
        raise UserError(f"cannot import '{module_name}' for encoder '{target}': {error}; install it or add its "
                        f"folder to PYTHONPATH{';' + source_hint if source_hint else ''}") from error
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UserError(f"'{module_name}' has no attribute '{attribute}' (encoder '{target}')")
        factory = getattr(factory, part)
    module = _call_factory(factory, options, what=target)
    return BuiltEncoder(module, weights_into=module, info={"architecture": target},
                        digest_files=_source_file(factory))


def _source_file(factory: Any) -> tuple[Path, ...]:
    """The file that defines `factory`, so that editing it changes the encoder's digest (and re-embeds); none for
    factories without a Python source (builtins, C extensions)."""
    try:
        path = Path(inspect.getsourcefile(factory) or "")
    except TypeError:
        return ()
    return (path,) if path.is_file() else ()


def _call_factory(factory: Callable, options: dict, *, what: str) -> nn.Module:
    if not callable(factory):
        raise UserError(f"'{what}' is not callable; name a class or a function returning an nn.Module")
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself check
        parameters = ()
    if parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in options:
            if key not in accepted:
                raise UserError(f"'{what}' has no option '{key}';{did_you_mean(key, accepted)} "
                                f"(options: {', '.join(sorted(accepted)) or 'none'})")
    try:
        module = factory(**options)
    except TypeError as error:
        raise UserError(f"building '{what}' with options {options} failed: {error}") from error
    if not isinstance(module, nn.Module):
        raise UserError(f"'{what}' returned a {type(module).__name__}, not a torch.nn.Module")
    return module


# ---- weights ------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path, *, entry: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Reads tensors only: safetensors, or `torch.load(weights_only=True)`; never unpickles arbitrary objects.

    Returns:
        (state dict, the checkpoint entry it came from, or None when the file is the state dict itself).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if _is_safetensors(path):
        try:
            return load_file(str(path)), None
        except Exception as error:  # safetensors raises its own error type for a damaged or foreign file
            raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} holds pickled Python objects, not only tensors ({_pickle_reason(str(error))}); rafmedia never "
            "unpickles them because unpickling can run arbitrary code (a whole saved module is such a file). "
            "Where you trust the file, re-save only its weights: torch.save(model.state_dict(), 'weights.pt') or "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path} is not a safetensors or torch.save file ({error})") from None
    return _state_dict_entry(loaded, path, entry)


def _pickle_reason(message: str) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|\n\n|$)", message, re.DOTALL)
    return " ".join((found.group(1) if found else "unpickling refused").split())[:200]


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")  # u64 header size, then JSON


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _state_dict_entry(loaded: Any, path: Path, entry: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    if entry is not None:
        if not isinstance(loaded, dict) or not _is_state_dict(loaded.get(entry)):
            keys = sorted(loaded) if isinstance(loaded, dict) else []
            raise UserError(f"{path} has no state dict under state_dict_key '{entry}' (top-level keys: {keys[:10]})")
        return loaded[entry], entry
    if _is_state_dict(loaded):
        return loaded, None
    if isinstance(loaded, dict):
        found = [key for key in CHECKPOINT_ENTRIES if _is_state_dict(loaded.get(key))]
        if len(found) == 1:
            return loaded[found[0]], found[0]
        candidates = [str(key) for key, value in loaded.items() if _is_state_dict(value)]
        raise UserError(f"{path} is a checkpoint dict, not a state dict; choose the entry holding the weights with "
                        f"options state_dict_key=... (entries holding tensors: {candidates or 'none'})")
    raise UserError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")


def fit_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                   ignored_prefixes: tuple[str, ...] = (), source: str = "weights file"
                   ) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Matches a file's keys to a module's, stripping wrapper prefixes only when that makes them match exactly.

    A chain of `COMMON_PREFIXES` shared by every key (e.g. "module." from DDP, then "encoder.") is stripped
    one at a time; keys under `ignored_prefixes` that the module lacks (a classifier) are dropped. BatchNorm
    `num_batches_tracked` counters may be missing. Anything else is a `UserError` listing missing and
    unexpected keys with counts and the prefix that would make most keys match.

    Returns:
        (the matched state dict, the stripped prefix or "", the dropped keys).
    """
    candidate, stripped = dict(state), ""
    while True:
        kept, dropped = _drop_ignored(candidate, expected, ignored_prefixes)
        missing = [key for key in expected if key not in kept and not key.endswith(OPTIONAL_KEY_SUFFIXES)]
        if not missing and all(key in expected for key in kept):
            _check_shapes(kept, expected, source)
            return kept, stripped, dropped
        prefix = next((p for p in COMMON_PREFIXES if all(key.startswith(p) for key in candidate)), None)
        if prefix is None:
            break
        candidate = {key[len(prefix):]: value for key, value in candidate.items()}
        stripped += prefix
    missing = sorted(key for key in expected if key not in state)
    unexpected = sorted(key for key in state if key not in expected)
    raise UserError(f"{source} does not fit the architecture: {len(missing)} missing keys {_some(missing)}, "
                    f"{len(unexpected)} unexpected keys {_some(unexpected)}.{_prefix_hint(state, expected)}")


def _drop_ignored(state: dict, expected: dict, ignored_prefixes: tuple[str, ...]) -> tuple[dict, list[str]]:
    dropped = [key for key in state if key not in expected and key.startswith(ignored_prefixes)]
    return {key: value for key, value in state.items() if key not in dropped}, sorted(dropped)


def _check_shapes(state: dict, expected: dict, source: str) -> None:
    wrong = [f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}" for key, value in state.items()
             if tuple(value.shape) != tuple(expected[key].shape)]
    if wrong:
        raise UserError(f"{source} has the right keys but {len(wrong)} tensors of the wrong shape "
                        f"({'; '.join(wrong[:3])}"
                        f"{' ...' if len(wrong) > 3 else ''}); check options such as channels and widths")


def _prefix_hint(state: dict, expected: dict) -> str:
    """The prefix whose removal (or addition) makes most of the module's keys match, as a hint."""
    direct = sum(key in expected for key in state)
    prefixes = {".".join(key.split(".")[:depth]) + "." for key in list(state) + list(expected)
                for depth in (1, 2) if key.count(".") >= depth}
    best, best_count, direction = "", 0, ""
    for prefix in sorted(prefixes):
        strip = sum(key.startswith(prefix) and key[len(prefix):] in expected for key in state)
        add = sum(prefix + key in expected for key in state)
        for count, how in ((strip, "strip"), (add, "add")):
            if count > best_count:
                best, best_count, direction = prefix, count, how
    if best_count <= direct or 2 * best_count < len(expected):  # a prefix must explain most keys to be the cause
        return (f" {direct} of the module's {len(expected)} keys match by name and no prefix explains the rest: "
                "the file is probably from another architecture or configuration (compare the options).")
    if direction == "strip":
        return (f" {best_count} of the module's {len(expected)} keys are in the file under the prefix '{best}': keep "
                f"those and strip it, e.g. {{k.removeprefix('{best}'): v for k, v in state.items() "
                f"if k.startswith('{best}')}}, then save that.")
    return (f" {best_count} of the file's keys match once the prefix '{best}' is added (the module nests them under "
            f"'{best}'): save {{'{best}' + k: v for k, v in state.items()}} instead.")


def _some(keys: list[str], limit: int = 4) -> str:
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---- the contract -------------------------------------------------------------------------------------
class ContractAdapter(nn.Module):
    """Makes a module's output the contract's pooled embedding: selects one output of a tuple/list/dict, then
    pools a token sequence (B, N, C) over tokens or a feature map (B, C, *spatial) over space (mean or max)."""

    def __init__(self, network: nn.Module, *, embed_dim: int, output_index: int | str | None, feature_pool: str):
        super().__init__()
        self.network, self.embed_dim = network, int(embed_dim)
        self.output_index, self.feature_pool = output_index, feature_pool

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        """The selected raw output: (B, D), (B, N, C) tokens or (B, C, *spatial) feature map."""
        return _select(self.network(x_BCDHW), self.output_index)

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return _pool(self.forward_features(x_BCDHW), self.feature_pool)


def conform_to_contract(module: nn.Module, *, input_shape: list[int] | None = None, output_index: int | str = 0,
                        feature_pool: str = "mean") -> tuple[nn.Module, str]:
    """Returns the module itself when it already gives (B, embed_dim), else a `ContractAdapter` around it.

    One dummy forward of two zero volumes of `input_shape` shows what the module returns and sets `embed_dim`.
    """
    if feature_pool not in FEATURE_POOLS:
        raise unknown_name_error("feature_pool", feature_pool, FEATURE_POOLS)
    shape = list(input_shape) if input_shape is not None else [_input_channels(module), *DEFAULT_SPATIAL]
    if len(shape) != 4:
        raise UserError(f"input_shape must be [C, D, H, W], got {input_shape!r}")
    with torch.no_grad():
        try:
            output = module(torch.zeros(2, *shape, device=_device_of(module)))
        except Exception as error:  # any failure here means the dummy input does not suit the network
            raise UserError(f"a forward of a (2, {', '.join(map(str, shape))}) volume through the encoder failed "
                            f"({type(error).__name__}: {error}); set options input_shape=[C, D, H, W] to an input "
                            "this network accepts") from error
    is_tuple = isinstance(output, (tuple, list, dict))
    selected = _select(output, output_index) if is_tuple else output
    if not isinstance(selected, torch.Tensor) or selected.ndim not in (2, 3, 4, 5) or selected.shape[0] != 2:
        raise UserError(f"the encoder's output {_describe(output)} is not (B, D), (B, N, C) tokens or a (B, C, ...) "
                        "feature map; choose the embedding with options output_index=...")
    if not is_tuple and selected.ndim == 2 and getattr(module, "embed_dim", None) == selected.shape[1]:
        return module, "none"
    embed_dim = selected.shape[2] if selected.ndim == 3 else selected.shape[1]
    adapter = ContractAdapter(module, embed_dim=embed_dim, output_index=output_index if is_tuple else None,
                              feature_pool=feature_pool)
    kind = {2: "embedding", 3: f"{feature_pool} over tokens"}.get(selected.ndim, f"{feature_pool} over space")
    return adapter, (f"output[{output_index!r}], " if is_tuple else "") + kind


def _select(output: Any, output_index: int | str | None) -> torch.Tensor:
    if output_index is None:
        return output
    try:
        return output[output_index]
    except (IndexError, KeyError, TypeError):
        raise UserError(f"output_index {output_index!r} does not select from the encoder's output "
                        f"{_describe(output)}") from None


def _pool(features: torch.Tensor, feature_pool: str) -> torch.Tensor:
    if features.ndim == 2:
        return features
    dims = (1,) if features.ndim == 3 else tuple(range(2, features.ndim))  # tokens (B, N, C) or (B, C, *spatial)
    return features.mean(dim=dims) if feature_pool == "mean" else features.amax(dim=dims)


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"tensor{tuple(output.shape)}"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{key!r}: {_describe(value)}" for key, value in output.items()) + "}"
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(_describe(value) for value in output) + ")"
    return type(output).__name__


def _input_channels(module: nn.Module) -> int:
    first = next((m for m in module.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
    return first.in_channels if first is not None else 1


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ---- digest -------------------------------------------------------------------------------------------
def encoder_digest(spec: str, *, options: dict, weights: str | Path | None, extra_files=()) -> str:
    """16 hex digits of sha256 over the spec, the options (canonical JSON) and the bytes of the weights file
    (and model card): the encoder's identity for the embedding cache."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"spec": str(spec), "options": options}, sort_keys=True, default=str).encode())
    if weights is None:
        digest.update(f"random-init:{INIT_SEED}".encode())
    for path in ([weights] if weights is not None else []) + list(extra_files):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
