"""Makes torchvision (and so timm) importable with a CPU build of torch.

The registry's torchvision wheel is compiled against CUDA; with the CPU torch its `_C` library fails to
load, and `import torchvision` then dies with `operator torchvision::nms does not exist`, because its
fake-tensor registrations assume the operator schema exists. When, and only when, the compiled library
does not load, we define the `torchvision::nms` and `torchvision::qnms` schemas with a pure-torch CPU
kernel before torchvision is imported. Everything else of torchvision keeps its own behaviour (the
compiled-only ops such as roi_align still raise torchvision's own error).

Import timm and torchvision through `import_timm()` / `import_torchvision()`; nothing else in rafmedia
imports them directly.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

_FALLBACK_LIBRARY = None  # keeps the torch.library registration alive for the process


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, same contract as `torchvision.ops.nms`.

    Args:
        boxes: (N, 4) boxes as (x1, y1, x2, y2).
        scores: (N,) scores.
        iou_threshold: boxes overlapping a kept box with IoU above this are discarded.

    Returns:
        int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.argsort(scores, descending=True, stable=True)
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        width = (torch.minimum(x2[index], x2) - torch.maximum(x1[index], x1)).clamp(min=0)
        height = (torch.minimum(y2[index], y2) - torch.maximum(y1[index], y1)).clamp(min=0)
        intersection = width * height
        iou = intersection / (areas[index] + areas - intersection).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _qnms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return nms_reference(boxes.dequantize(), scores.dequantize(), iou_threshold)


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to fix
    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def install_fallback_if_needed() -> bool:
    """Registers the pure-torch NMS schema if torchvision's compiled ops cannot load.

    Must run before torchvision is imported. Returns True when the fallback is in use.
    """
    global _FALLBACK_LIBRARY
    if _FALLBACK_LIBRARY is not None:
        return True
    if "torchvision" in sys.modules or _compiled_ops_load():
        return False
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", nms_reference, "CPU")
    library.impl("qnms", _qnms_reference, "QuantizedCPU")
    _FALLBACK_LIBRARY = library
    return True


def import_torchvision():
    """Imports torchvision, installing the CPU fallback first when its compiled ops cannot load."""
    fallback = install_fallback_if_needed()
    torchvision = importlib.import_module("torchvision")
    if fallback:
        # torchvision.ops.nms refuses to run without its compiled library; ours now provides nms.
        boxes = importlib.import_module("torchvision.ops.boxes")
        boxes._assert_has_ops = lambda: None
    return torchvision


def import_timm():
    """Imports timm (which imports torchvision.ops) safely on CPU-only torch."""
    import_torchvision()
    return importlib.import_module("timm")
