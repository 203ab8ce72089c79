"""Checks an uploaded encoder before it is queued: nothing in it is trusted, and every refusal says what to fix.

In order, stopping at the first problem:
1. the weights file is safetensors: a pickle (`torch.save`, a `.pt`/`.pth`/`.ckpt` file) is refused by its first
   bytes, before anything could unpickle it; the header length, its JSON, every tensor's dtype, shape and byte
   range are checked against the file (ranges in order, without gaps or overlaps, ending at the file's end);
2. the card is a JSON object of format `rafmedia.encoder/1` naming a registered architecture, with options the
   architecture's factory accepts (plain JSON values);
3. the architecture is built on PyTorch's meta device first (no memory) and its parameter count compared with
   the header's, so a card cannot make the server allocate a model larger than the upload;
4. the weights load into the architecture, every key matching (`load_weights`);
5. one forward pass on a dummy volume of the challenge's channels and shape returns (1, embed_dim) finite values.

A card may instead name a `factory` ("module:function") of the participant's own code, uploaded with it as one
`.py` file or a `.tar.gz` package (`check_code`). Steps 3-5 then run in the sandbox at scoring time
(portal/sandbox.py): the web server never imports uploaded code.
"""
from __future__ import annotations

import json
import math
import re
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import torch

from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.encoders.base import ENCODERS
from rafmedia.engine.export import ENCODER_FORMAT, load_weights

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_CARD_BYTES = 64 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PICKLE_SIGNS = {b"\x80": "a Python pickle (torch.save of PyTorch < 1.6 or pickle.dump)",
                b"PK\x03\x04": "a zip archive (torch.save writes a zipped pickle: .pt, .pth, .ckpt)"}
FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
GZIP_MAGIC = b"\x1f\x8b"
MAX_CODE_FILES = 200
HOW_TO_EXPORT = ("export it with `raf pretrain` (encoder.safetensors + encoder.card.json), or with "
                 "safetensors.torch.save_file(model.state_dict(), 'encoder.safetensors')")


class InvalidSubmission(UserError):
    """An upload the portal refuses; the message is shown to the participant as it is."""


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensors (name -> dtype, shape, data_offsets) of a well-formed safetensors file; refuses anything else."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        for sign, what in PICKLE_SIGNS.items():
            if head.startswith(sign):
                raise InvalidSubmission(f"the weights file is {what}, which the portal never loads (loading a "
                                        f"pickle runs code); {HOW_TO_EXPORT}")
        if len(head) < 8:
            raise InvalidSubmission(f"the weights file has {size} bytes: too short to be safetensors")
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidSubmission(f"the weights file is not safetensors: its first 8 bytes announce a "
                                    f"{header_bytes}-byte header in a {size}-byte file; {HOW_TO_EXPORT}")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidSubmission("the weights file's safetensors header is not JSON: the file is damaged or not "
                                f"safetensors; {HOW_TO_EXPORT}") from None
    if not isinstance(header, dict):
        raise InvalidSubmission("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda item: _offsets(item)[0]):
        dtype, shape, (start, stop) = _tensor_info(name, info)
        if start != end:
            raise InvalidSubmission(f"tensor '{name}' starts at byte {start} of the data, expected {end} "
                                    "(a gap or an overlap): the file is damaged")
        expected = DTYPE_BYTES[dtype] * math.prod(shape)
        if stop - start != expected:
            raise InvalidSubmission(f"tensor '{name}' ({dtype} {shape}) needs {expected} bytes, its range holds "
                                    f"{stop - start}: the file is damaged")
        tensors[name], end = {"dtype": dtype, "shape": shape}, stop
    if 8 + header_bytes + end != size:
        raise InvalidSubmission(f"the weights file has {size - 8 - header_bytes - end} bytes beyond its last "
                                "tensor (or too few): it is damaged or was cut short")
    if not tensors:
        raise InvalidSubmission("the weights file holds no tensors")
    return tensors


def _offsets(item: tuple[str, Any]) -> tuple[int, int]:
    info = item[1]
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            or offsets[0] > offsets[1]):
        raise InvalidSubmission(f"tensor '{item[0]}' has no valid data_offsets in the safetensors header")
    return offsets[0], offsets[1]


def _tensor_info(name: str, info: dict[str, Any]) -> tuple[str, list[int], tuple[int, int]]:
    dtype, shape = info.get("dtype"), info.get("shape")
    if dtype not in DTYPE_BYTES:
        raise InvalidSubmission(f"tensor '{name}' has dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)):
        raise InvalidSubmission(f"tensor '{name}' has an invalid shape {shape!r}")
    return dtype, shape, _offsets((name, info))


def check_card(card_file: str | Path) -> dict[str, Any]:
    """The card, checked: format, a registered architecture, options its factory accepts, plain JSON values."""
    card_file = Path(card_file)
    if card_file.stat().st_size > MAX_CARD_BYTES:
        raise InvalidSubmission(f"the card is larger than {MAX_CARD_BYTES // 1024} KB")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidSubmission(f"the card is not JSON ({error}); upload the encoder.card.json written next to "
                                "encoder.safetensors by `raf pretrain`") from None
    if not isinstance(card, dict) or card.get("format") != ENCODER_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise InvalidSubmission(f"the card's format is {found!r}, not {ENCODER_FORMAT!r}")
    options = card.get("options", {})
    if not isinstance(options, dict):
        raise InvalidSubmission("the card's options must be a JSON object")
    if not all(_plain(value) for value in options.values()):
        raise InvalidSubmission("every option must be a number, string, boolean or a short list of them")
    if "factory" in card:
        factory = card["factory"]
        if not isinstance(factory, str) or not FACTORY.match(factory) or len(factory) > 200:
            raise InvalidSubmission(f"the card's factory {str(factory)[:200]!r} is not 'module:function' (for "
                                    "example 'my_encoder:build', a function of the uploaded code)")
        return card
    architecture = card.get("architecture")
    if not isinstance(architecture, str) or architecture not in ENCODERS:
        raise InvalidSubmission(f"architecture {architecture!r} is not one the portal knows;"
                                f"{did_you_mean(str(architecture), ENCODERS.names())} (known: "
                                f"{', '.join(ENCODERS.names())}); to submit an encoder of your own code, upload "
                                "the code and name its factory in the card ('factory': 'module:function')")
    for key in options:
        if not ENCODERS.accepts(architecture, key):
            raise InvalidSubmission(f"option '{key}' is not an option of architecture '{architecture}' "
                                    f"(options: {', '.join(sorted(ENCODERS.options(architecture) or []))})")
    return card


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return not isinstance(value, str) or len(value) <= 200
    return isinstance(value, list) and depth < 2 and len(value) <= 16 and all(_plain(v, depth + 1) for v in value)


def check_encoder(weights: str | Path, card_file: str | Path, *, channels: int, shape: list[int]) -> dict[str, Any]:
    """Runs every check of the module docstring; returns the card. Raises `InvalidSubmission`. For a card naming
    the participant's own factory only the weights' format and the card are checked here."""
    tensors = read_safetensors_header(weights)
    card = check_card(card_file)
    if "factory" in card:
        return card
    architecture, options = card["architecture"], card.get("options", {})
    try:
        with torch.device("meta"):
            skeleton = create_encoder(architecture, **options)
    except Exception as error:  # a factory refusing its options: the participant's to fix
        raise InvalidSubmission(f"architecture '{architecture}' cannot be built with options {options}: "
                                f"{error}") from None
    expected = {name: list(t.shape) for name, t in skeleton.state_dict().items()}
    found = {name: t["shape"] for name, t in tensors.items()}
    if expected != found:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise InvalidSubmission(f"the weights do not fit architecture '{architecture}' with options {options}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    encoder = create_encoder(architecture, **options)
    try:
        load_weights(encoder, weights, card)
        with torch.no_grad():
            out = encoder(torch.zeros(1, channels, *shape))
    except UserError as error:
        raise InvalidSubmission(str(error)) from None
    except Exception as error:
        raise InvalidSubmission(f"a forward pass on one {channels}-channel volume of shape {shape} failed: "
                                f"{type(error).__name__}: {error}") from None
    embed_dim = int(getattr(encoder, "embed_dim", -1))
    if tuple(out.shape) != (1, embed_dim) or not torch.isfinite(out).all():
        raise InvalidSubmission(f"a forward pass on one volume returned shape {tuple(out.shape)} (expected "
                                f"(1, {embed_dim})) or values that are not finite")
    return card


def check_code(upload: str | Path, folder: str | Path, *, factory: str, max_bytes: int) -> int:
    """Unpacks the participant's code into `folder` after checking it; returns its number of files.

    One `.py` file (UTF-8) becomes `folder/<module>.py` for the factory's module; a `.tar.gz` may hold only
    regular files and folders with plain relative names (no links, devices, absolute paths or `..`), at most
    `MAX_CODE_FILES` of them and `max_bytes` in all once unpacked. The factory's module must be among them. Nothing
    is imported or compiled here."""
    upload, folder = Path(upload), Path(folder)
    size = upload.stat().st_size
    if size > max_bytes:
        raise InvalidSubmission(f"the code is {size / 1024:.0f} KB; the limit is {max_bytes // 1024} KB")
    module = factory.split(":")[0]
    with open(upload, "rb") as handle:
        head = handle.read(2)
    folder.mkdir()
    if head == GZIP_MAGIC:
        count = _unpack_package(upload, folder, max_bytes)
    else:
        try:
            source = upload.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidSubmission("the code is neither a UTF-8 Python file nor a .tar.gz package") from None
        if "." in module:
            raise InvalidSubmission(f"the factory's module '{module}' is in a package: upload the package as a "
                                    ".tar.gz (tar czf code.tar.gz PACKAGE/)")
        (folder / f"{module}.py").write_text(source, encoding="utf-8")
        count = 1
    base = folder.joinpath(*module.split("."))
    if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
        raise InvalidSubmission(f"the factory's module '{module}' is not in the uploaded code (expected "
                                f"{'/'.join(module.split('.'))}.py or {'/'.join(module.split('.'))}/__init__.py)")
    return count


def _unpack_package(upload: Path, folder: Path, max_bytes: int) -> int:
    try:
        archive = tarfile.open(upload, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InvalidSubmission(f"the code package is not a readable .tar.gz ({error})") from None
    with archive:
        total, members = 0, []
        try:
            for member in archive:
                if len(members) >= MAX_CODE_FILES:
                    raise InvalidSubmission(f"the code package holds more than {MAX_CODE_FILES} entries")
                parts = member.name.split("/")
                if (member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir())
                        or not all(re.fullmatch(r"[\w.\-]{1,100}", part) for part in parts if part not in ("", "."))):
                    raise InvalidSubmission(f"the code package's entry '{member.name[:200]}' is not allowed (only "
                                            "regular files and folders with plain relative names)")
                total += member.size
                if total > max_bytes:
                    raise InvalidSubmission(f"the code package unpacks to more than {max_bytes // 1024} KB")
                members.append(member)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise InvalidSubmission(f"the code package is damaged ({error})") from None
        for member in members:
            target = folder / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            target.write_bytes(source.read(max_bytes + 1) if source is not None else b"")
    return sum(1 for member in members if member.isfile())

