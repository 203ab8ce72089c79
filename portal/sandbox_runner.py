"""Runs inside the sandbox (portal/sandbox.py starts it with bubblewrap): builds a participant's encoder from their
own code and embeds the batches the scorer hands it. Imports only the standard library, numpy, torch and
safetensors: rafmedia itself is not mounted in the sandbox.

Everything here runs next to the participant's code and may be rewritten by it, so nothing this file checks is
trusted: the scorer outside validates every embedding file it reads back. The exchange goes through files under
/raf-submission (read-only: code/, encoder.safetensors, encoder.card.json), /raf-inputs (read-only, written by
the scorer) and /raf-work (the only writable folder):

- start: build the encoder (`factory` of the card, with its `options`), load the weights strictly, one forward
  pass on /raf-inputs/dummy.npy, then write work/ready.json {"embed_dim": D};
- then, for each line NAME read on stdin: embed inputs/NAME.npy ((B, C, D, H, W) float32) and write work/NAME.npy
  ((B, D) float32), renamed into place when complete;
- on an exception: work/error.json {"type", "errno", "message", "builtin"} and exit status 1.
"""
import builtins
import importlib
import json
import os
import sys
import traceback

import numpy as np
import torch
from safetensors.torch import load_file

SUBMISSION, INPUTS, WORK = "/raf-submission", "/raf-inputs", "/raf-work"


def write_json(name, value):
    with open(f"{WORK}/{name}.tmp", "w") as handle:
        json.dump(value, handle)
    os.replace(f"{WORK}/{name}.tmp", f"{WORK}/{name}")


def build():
    with open(f"{SUBMISSION}/encoder.card.json") as handle:
        card = json.load(handle)
    sys.path.insert(0, f"{SUBMISSION}/code")
    module_name, function_name = card["factory"].split(":")
    factory = getattr(importlib.import_module(module_name), function_name)
    model = factory(**card.get("options", {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{card['factory']} returned a {type(model).__name__}, not a torch.nn.Module")
    model.load_state_dict(load_file(f"{SUBMISSION}/encoder.safetensors"), strict=True)
    return model.eval()


def embed(model, name):
    with torch.no_grad():
        out = model(torch.from_numpy(np.load(f"{INPUTS}/{name}.npy")))
    np.save(f"{WORK}/{name}.tmp.npy", out.detach().float().cpu().numpy())
    os.replace(f"{WORK}/{name}.tmp.npy", f"{WORK}/{name}.npy")
    return out


def main():
    try:
        model = build()
        write_json("ready.json", {"embed_dim": int(embed(model, "dummy").shape[-1])})
        sys.stdout.flush()
        for line in sys.stdin:
            embed(model, line.strip())
            sys.stdout.flush()
    except BaseException as error:  # reported to the scorer, which decides what the participant is told
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # the log may be what failed (the output limit)
            pass
        try:
            write_json("error.json", {"type": type(error).__name__, "errno": getattr(error, "errno", None),
                                      "message": str(error)[:2000],
                                      "builtin": getattr(builtins, type(error).__name__, None) is type(error)})
        except BaseException:
            pass
        os._exit(1)


if __name__ == "__main__":
    main()
