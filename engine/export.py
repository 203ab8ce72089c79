"""Weights as safetensors plus a JSON card next to them, written atomically and read back with clear errors.

One mechanism for every exported module: `save_with_card` writes both files, `read_card` finds and checks the card
(its `format` names what the weights are), `load_weights` fills a module rebuilt from the card and names the keys
that do not fit. Weights are only ever read through safetensors (no unpickling).

- Encoders (`raf pretrain`): `export_encoder` / `load_encoder`, card format `rafmedia.encoder/1`; the card names
  the registered architecture and its options, so `load_encoder` can rebuild the module.
- The shape prior (`rafmedia.engine.tasks.shape`): `export_extra` / `load_shape_prior`, `rafmedia.shape_prior/1`.
- The Hugging Face layout (`raf export --hf`): `export_hf` writes a folder of `config.json` (the card),
  `model.safetensors` (the encoder's plain state dict) and `README.md` (a model card with YAML front matter);
  `RafEncoder.from_pretrained(folder)` rebuilds the encoder offline, and `load_encoder(folder)` reads it as an export.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write, read_json, write_json
from rafmedia.engine.encoders import create_encoder

CARD_SUFFIX = ".card.json"
ENCODER_FORMAT = "rafmedia.encoder/1"
HF_CONFIG, HF_WEIGHTS, HF_README = "config.json", "model.safetensors", "README.md"
HF_TAGS = ("rafmedia", "medical-imaging", "3d", "feature-extraction", "self-supervised")


def card_path(weights: str | Path) -> Path:
    """The card next to `weights`: `encoder.safetensors` -> `encoder.card.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + CARD_SUFFIX)


def save_with_card(module: torch.nn.Module, weights: str | Path, card: dict[str, Any], *,
                   metadata: dict[str, str]) -> tuple[Path, Path]:
    """Writes `module`'s state dict to `weights` (safetensors, `metadata` in its header) and `card` next to it
    (`card_path`), each atomically; returns both paths."""
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return Path(weights), write_json(card_path(weights), card)


def is_hf_export(path: str | Path) -> bool:
    """Whether `path` is a folder in the Hugging Face layout of `export_hf` (config.json + model.safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()


def export_files(export: str | Path) -> tuple[Path, Path]:
    """(weights, card) of an export: `x.safetensors` and `x.card.json`, or a Hugging Face folder's
    `model.safetensors` and `config.json`."""
    export = Path(export)
    if export.is_dir():
        return export / HF_WEIGHTS, export / HF_CONFIG
    return export, card_path(export)


def read_card(weights: str | Path, *, card_format: str, what: str, how_to_export: str) -> dict[str, Any]:
    """The card of `weights`, after checking that both files exist and that the card is a `card_format` one.

    Args:
        what: what the weights hold, for the errors ("encoder", "shape prior").
        how_to_export: the fix when the card is missing ("export it with `raf pretrain`").
    """
    weights, card_file = export_files(weights)
    if not weights.is_file():
        raise UserError(f"{what} weights not found: {weights}")
    if not card_file.is_file():
        raise UserError(f"{weights} has no model card {card_file.name} next to it; {how_to_export}")
    card = read_json(card_file)
    if card.get("format") != card_format:
        raise UserError(f"{card_file} is a '{card.get('format')}' card, not a {what} card ({card_format})")
    return card


def load_weights(module: torch.nn.Module, weights: str | Path, card: dict[str, Any]) -> torch.nn.Module:
    """Loads `weights` into `module` (rebuilt from `card`), every key matching; returns it in eval mode."""
    result = module.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{weights} does not fit architecture '{card['architecture']}' with options "
                        f"{card.get('options')}: missing keys {_some(result.missing_keys)}, unexpected keys "
                        f"{_some(result.unexpected_keys)}")
    return module.eval()


def export_encoder(encoder: torch.nn.Module, weights: str | Path, *, architecture: str, options: dict[str, Any],
                   card: dict[str, Any]) -> Path:
    """Writes `weights` (safetensors) and its model card atomically; returns the weights path."""
    save_with_card(encoder, weights, {"format": ENCODER_FORMAT, "architecture": architecture, "options": options,
                                      "embed_dim": int(encoder.embed_dim), **card},
                   metadata={"architecture": architecture})
    return Path(weights)


def load_encoder(weights: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuilds an exported encoder from its card and safetensors weights; returns (encoder, card)."""
    card = read_card(weights, card_format=ENCODER_FORMAT, what="encoder",
                     how_to_export="export it with `raf pretrain`")
    encoder = create_encoder(card["architecture"], **card.get("options", {}))
    return load_weights(encoder, export_files(weights)[0], card), card


# ---- the Hugging Face layout -----------------------------------------------------------------------------------------
class RafEncoder(torch.nn.Module, PyTorchModelHubMixin, library_name="rafmedia", tags=list(HF_TAGS)):
    """An exported encoder in the Hugging Face layout: `RafEncoder.from_pretrained(folder or hub id)` rebuilds it
    from `config.json` (architecture, options and the rest of the card) and `model.safetensors`.

    It honours the encoder contract (`embed_dim`, `forward`, `forward_features`) by delegating to `self.encoder`,
    the registered architecture, whose state dict is the file's (no prefix: plain safetensors loads it into
    `create_encoder(architecture, **options)`). The card's other entries are kept in `self.card`.
    """

    def __init__(self, architecture: str, options: dict[str, Any] | None = None, embed_dim: int | None = None,
                 **card: Any):
        super().__init__()
        self.encoder = create_encoder(architecture, **(options or {}))
        self.embed_dim = int(self.encoder.embed_dim)
        self.card = {"architecture": architecture, "options": dict(options or {}), **card,
                     "embed_dim": self.embed_dim}

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(x_BCDHW)

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x_BCDHW)

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {key: value.detach().cpu().contiguous() for key, value in self.encoder.state_dict().items()}
        save_file(state, str(Path(save_directory) / HF_WEIGHTS), metadata={"format": "pt",
                                                                            "architecture": self.card["architecture"]})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", strict: bool = False,
                         **model_kwargs) -> RafEncoder:
        model = cls(**model_kwargs)
        if Path(model_id).is_dir():
            weights = Path(model_id) / HF_WEIGHTS
        else:
            weights = hf_hub_download(model_id, HF_WEIGHTS, revision=revision, cache_dir=cache_dir, token=token,
                                      force_download=force_download, local_files_only=local_files_only)
        load_weights(model.encoder, weights, model.card)
        return model.to(map_location).eval()


def export_hf(weights: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Writes the export `weights` (with its card) as a Hugging Face folder `out_dir`: config.json (the card),
    model.safetensors and README.md (`model_card_text`). Written in a sibling folder, then renamed into place."""
    encoder, card = load_encoder(weights)
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not (overwrite or is_hf_export(out_dir)) and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not a rafmedia Hugging Face export; choose another OUT_DIR or "
                        "remove it")
    model = RafEncoder(**{key: value for key, value in card.items() if key != "embed_dim"})
    model.encoder.load_state_dict(encoder.state_dict())
    temporary = out_dir.with_name(f".{out_dir.name}.writing.{uuid.uuid4().hex[:8]}")
    temporary.mkdir(parents=True)
    try:
        (temporary / HF_README).write_text(model_card_text(model.card), encoding="utf-8")
        model.save_pretrained(temporary, config=model.card)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(temporary, out_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out_dir


def model_card_text(card: dict[str, Any]) -> str:
    """README.md of a Hugging Face export: YAML front matter (license, library_name, tags), then what the encoder
    is, how it was trained, its preprocessing and how to load it."""
    licence = str(card.get("licence") or "unspecified")
    known = licence.lower() not in ("unspecified", "unknown")
    front = [f"license: {licence.lower() if known else 'other'}"] + ([] if known else [f"license_name: {licence}"])
    tags = [*HF_TAGS] + [str(tag) for tag in (card.get("task"), card.get("architecture")) if tag]
    data = card.get("data") or {}
    lines = ["---", *front, "library_name: rafmedia", "tags:", *[f"- {tag}" for tag in tags], "---", "",
             f"# {card.get('name') or card['architecture']}", "",
             (f"A 3D image encoder (`{card['architecture']}`, options `{card.get('options', {})}`, embedding size "
              f"{card.get('embed_dim')}) exported by rafmedia."), "", "## Training", "",
             f"- pretext task: `{card.get('task', 'unknown')}` with options `{card.get('task_options', {})}`",
             f"- steps: {card.get('steps', 'unknown')}; weights: {card.get('weights', 'unknown')}",
             (f"- data: {data.get('num_subjects', '?')} subjects of `{data.get('cohort', '?')}`; data licence: "
              f"{data.get('licence', 'unknown')}; sources: {_sources_text(data.get('sources'))}"),
             f"- weights licence: {licence}",
             f"- code: {_code_text(card.get('code_version'))}", "", "## Preprocessing", "",
             *_preprocessing_lines(card.get("preprocessing")), "", "## Loading", "", "```python",
             "from rafmedia.engine.export import RafEncoder", "", 'encoder = RafEncoder.from_pretrained("THIS_FOLDER")',
             "embedding_BD = encoder(x_BCDHW)  # x_BCDHW prepared as above", "```", "",
             "Or score it directly: `raf evaluate --encoder THIS_FOLDER --cohort STORE` (config.json is its card).", ""]
    return "\n".join(lines)


def _sources_text(sources: list[dict[str, Any]] | None) -> str:
    if not sources:
        return "not recorded"
    return ", ".join(f"{s.get('name')} ({s.get('licence')}, {s.get('subjects')} subjects)" for s in sources)


def _code_text(version: dict[str, Any] | None) -> str:
    if not version:
        return "not recorded"
    git = version.get("git")
    where = f"git {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "not a git checkout"
    return f"rafmedia {version.get('rafmedia')}, {where}"


def _preprocessing_lines(preprocessing: dict[str, Any] | None) -> list[str]:
    if not preprocessing:
        return ["Not recorded (an export older than the preprocessing record)."]
    intensity = preprocessing.get("intensity") or {}
    return [f"- orientation: {preprocessing.get('orientation')}; spacing (mm): {preprocessing.get('spacing')}",
            (f"- channels, in order: {preprocessing.get('channels')}; input: {preprocessing.get('input')}; input "
             f"size: {preprocessing.get('input_size')}"),
            *[f"- intensity of `{channel}`: {entry.get('policy')}, then {entry.get('then')}"
              for channel, entry in intensity.items()]]


def _some(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
