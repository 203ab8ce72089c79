"""A model of the step time of data-parallel SSL pretraining, and its predictions for 1 to 512 GPUs.

One step of one rank (docs/scaling.md derives and validates the form):

    t_step = t_host + max(t_load, t_gpu)
    t_load = b / (workers * r_worker)                       # background loader workers, prefetching
    t_gpu  = t_compute + max(0, t_allreduce - overlap * t_backward)
    t_compute = b * c_sample,  t_backward = 2/3 * t_compute
    t_allreduce (hierarchical ring, g GPUs per node, m nodes, S gradient bytes):
        2 (g-1)/g * S / B_intra  +  2 (m-1)/m * (S/g) / B_inter  +  latency terms

t_host is the serial work of the training process between steps (views made in the main process, host-device
copies, the optimizer's launch overhead); with no loader workers the loading is serial too and is added to it.
A rank's step is the slower of its loader and its device; the all-reduce hides behind the backward pass as far as
`overlap` allows (DDP buckets on NCCL: about 1; gloo on CPU shares the cores with compute: about 0).

Parameters come from a `raf profile` profile.json when given (`parameters_from_profile`: the keys are listed in
PROFILE_KEYS), else from the defaults below (measured on the 2-core CPU box for the loader; published or counted
figures for the GPU, each with its source in docs/scaling.md).

Run:  python benchmarks/scaling_model.py                       # prediction tables for ViT-B and ResEnc-L
      python benchmarks/scaling_model.py --profile runs/p/profile.json --mfu 0.35 --json predictions.json
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rafmedia.engine.accounting import PEAK_TFLOPS

# H100 SXM dense bf16 tensor-core peak (NVIDIA H100 Tensor Core GPU datasheet, without sparsity): 989.4 TFLOP/s,
# from the table the trainer's MFU uses.
H100_BF16_PEAK_FLOPS = PEAK_TFLOPS["H100"]["bf16"] * 1e12
GPU_COUNTS = (1, 8, 64, 512)


# ---- the terms ---------------------------------------------------------------------------------------------------
def compute_seconds(batch: int, seconds_per_sample: float) -> float:
    """Forward + backward + optimizer time of one rank's batch."""
    return batch * seconds_per_sample


def gpu_seconds_per_sample(flops_per_sample: float, peak_flops: float, mfu: float) -> float:
    """Device time of one sample from its model FLOPs (forward + backward) at a model-FLOPs utilisation."""
    return flops_per_sample / (peak_flops * mfu)


def load_seconds(batch: int, workers: int, patches_per_s_per_worker: float) -> float:
    """Time for the loader workers to produce one batch (0 workers: the main process loads, see step_seconds)."""
    return batch / (max(workers, 1) * patches_per_s_per_worker)


def allreduce_seconds(gradient_bytes: float, gpus: int, *, gpus_per_node: int, intra_bytes_per_s: float,
                      inter_bytes_per_s: float, intra_latency_s: float = 3e-6, inter_latency_s: float = 10e-6) -> float:
    """Hierarchical ring all-reduce: reduce-scatter inside the node, ring all-reduce of each GPU's 1/g shard across
    the m nodes (each GPU over its own NIC), all-gather inside the node. One GPU: nothing to reduce."""
    if gpus <= 1:
        return 0.0
    g = min(gpus, gpus_per_node)
    m = math.ceil(gpus / g)
    intra = 2 * (g - 1) / g * gradient_bytes / intra_bytes_per_s + 2 * (g - 1) * intra_latency_s
    inter = 2 * (m - 1) / m * (gradient_bytes / g) / inter_bytes_per_s + 2 * (m - 1) * inter_latency_s if m > 1 else 0.0
    return intra + inter


def exposed_comm_seconds(allreduce_s: float, compute_s: float, overlap: float) -> float:
    """The part of the all-reduce not hidden behind the backward pass (2/3 of forward + backward)."""
    return max(0.0, allreduce_s - overlap * (2.0 / 3.0) * compute_s)


def step_seconds(*, load_s: float, compute_s: float, allreduce_s: float, overlap: float, host_s: float = 0.0,
                 workers: int = 1) -> float:
    """One step: serial host work, then the slower of the loader and the device (compute + exposed all-reduce).
    With no workers the loading is serial: it adds to the step instead of overlapping it."""
    device_s = compute_s + exposed_comm_seconds(allreduce_s, compute_s, overlap)
    if workers == 0:
        return host_s + load_s + device_s
    return host_s + max(load_s, device_s)


def workers_needed(batch: int, device_s: float, patches_per_s_per_worker: float) -> int:
    """Loader workers per GPU for the loader to keep up with the device."""
    return max(1, math.ceil(batch / (device_s * patches_per_s_per_worker)))


# ---- the workloads and the machine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    side: int  # patch side (voxels)
    batch_per_gpu: int
    flops_per_sample: float  # forward + backward model FLOPs (torch.utils.flop_counter)
    parameters: int
    mfu: float  # assumed model-FLOPs utilisation on the GPU

    @property
    def gradient_bytes(self) -> float:
        return 4.0 * self.parameters  # fp32 gradients (DDP all-reduces in the parameters' dtype under autocast)


@dataclass(frozen=True)
class Machine:
    """A GPU cluster and its data path. Defaults: DGX H100-like nodes (8 GPUs on NVLink 4, one 400 Gb/s NDR
    InfiniBand NIC per GPU) and this box's loader speed per CPU core."""

    peak_flops: float = H100_BF16_PEAK_FLOPS
    gpus_per_node: int = 8
    intra_bytes_per_s: float = 0.8 * 450e9  # NVLink 4: 450 GB/s per direction per GPU, 80% reached by NCCL
    inter_bytes_per_s: float = 0.8 * 50e9  # 400 Gb/s = 50 GB/s per NIC, 80% reached
    overlap: float = 1.0  # DDP on NCCL overlaps gradient buckets with the backward pass
    # loader: voxels/s one worker reads, decodes and samples (build_stream_loader, 1 worker, 48^3 patches of the
    # 64^3 quickstart-like cohort), measured on this 2-core box by benchmarks/scaling.py (RESULTS.md)
    worker_voxels_per_s: float = 20e6
    stored_bytes_per_voxel: float = 2.0  # float32 at a zstd ratio of about 2
    chunk_side: int = 64
    patches_per_visit: int = 4  # patches drawn per subject read (data.patches_per_subject)
    workers_per_gpu: int = 12  # loader processes a GPU gets (a DGX H100 has 112 cores for 8 GPUs; some serve the ranks)

    def patches_per_s_per_worker(self, side: int) -> float:
        return self.worker_voxels_per_s / side ** 3

    def bytes_per_sample(self, side: int) -> float:
        """Stored bytes read per patch: a random patch touches (side + chunk)^3 voxels of chunks on average,
        shared by the patches drawn per visit."""
        return (side + self.chunk_side) ** 3 * self.stored_bytes_per_voxel / self.patches_per_visit


@dataclass
class Prediction:
    workload: str
    side: int
    gpus: int
    batch_per_gpu: int
    compute_ms: float
    allreduce_ms: float
    exposed_comm_ms: float
    step_ms: float
    samples_per_s: float  # whole job
    scaling_efficiency: float  # samples/s per GPU relative to one GPU
    workers_needed: int  # loader workers a GPU needs to stay fed
    storage_mb_per_s_needed: float  # stored bytes a GPU must read per second to stay fed (at the device's rate)
    bound: str  # loader | compute | all-reduce


def predict(workload: Workload, machine: Machine, gpus: int) -> Prediction:
    """Weak scaling: each GPU keeps `batch_per_gpu` and gets `machine.workers_per_gpu` loader workers."""
    b = workload.batch_per_gpu
    compute_s = compute_seconds(b, gpu_seconds_per_sample(workload.flops_per_sample, machine.peak_flops, workload.mfu))
    reduce_s = allreduce_seconds(workload.gradient_bytes, gpus, gpus_per_node=machine.gpus_per_node,
                                 intra_bytes_per_s=machine.intra_bytes_per_s, inter_bytes_per_s=machine.inter_bytes_per_s)
    exposed = exposed_comm_seconds(reduce_s, compute_s, machine.overlap)
    device_s = compute_s + exposed
    rate = machine.patches_per_s_per_worker(workload.side)
    load_s = load_seconds(b, machine.workers_per_gpu, rate)
    step = step_seconds(load_s=load_s, compute_s=compute_s, allreduce_s=reduce_s, overlap=machine.overlap,
                        workers=machine.workers_per_gpu)
    single = max(compute_s, load_s)  # one GPU: nothing to reduce
    bound = "loader" if load_s >= device_s else "all-reduce" if exposed > 0 else "compute"
    return Prediction(workload.name, workload.side, gpus, b, 1e3 * compute_s, 1e3 * reduce_s, 1e3 * exposed,
                      1e3 * step, gpus * b / step, single / step, workers_needed(b, device_s, rate),
                      b / device_s * machine.bytes_per_sample(workload.side) / 1e6, bound)


def comm_bound_batch(workload: Workload, machine: Machine, gpus: int) -> int:
    """The largest per-GPU batch at which the all-reduce is no longer hidden behind the backward pass (0: never)."""
    per_sample = gpu_seconds_per_sample(workload.flops_per_sample, machine.peak_flops, workload.mfu)
    reduce_s = allreduce_seconds(workload.gradient_bytes, gpus, gpus_per_node=machine.gpus_per_node,
                                 intra_bytes_per_s=machine.intra_bytes_per_s, inter_bytes_per_s=machine.inter_bytes_per_s)
    if reduce_s == 0 or machine.overlap == 0:
        return 0 if reduce_s == 0 else 10 ** 9
    return max(0, math.ceil(reduce_s / (machine.overlap * 2.0 / 3.0 * per_sample)) - 1)


# ---- FLOPs of the two architectures ------------------------------------------------------------------------------
def count_flops(build, side: int) -> tuple[float, int]:
    """Forward + backward FLOPs of one sample and the parameter count, counted on the meta device (no memory, no
    arithmetic: the counts come from the operators' shapes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build(side)
        x = torch.randn(1, 1, side, side, side)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def vit_base(side: int):
    from rafmedia.engine.encoders import create_encoder

    return create_encoder("vit_base_3d", img_size=side, patch_size=16)


def resenc_l(side: int):
    """A ResEnc-L-sized residual-encoder U-Net (nnU-Net's ResEncUNet topology: 6 stages of 32-320 features,
    (1, 3, 4, 6, 6, 6) residual blocks, one conv per decoder stage, 3^3 kernels), as a dense SSL backbone."""
    import torch
    from torch import nn

    def conv(cin, cout, stride=1):
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU())

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv(cin, cout, stride), nn.Conv3d(cout, cout, 3, 1, 1),
                                      nn.InstanceNorm3d(cout, affine=True))
            self.skip = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.AvgPool3d(stride) if stride > 1 else nn.Identity(), nn.Conv3d(cin, cout, 1)))

        def forward(self, x):
            return nn.functional.leaky_relu(self.body(x) + self.skip(x))

    class ResEncUNet(nn.Module):
        def __init__(self, features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6)):
            super().__init__()
            self.stem = conv(1, features[0])
            self.stages = nn.ModuleList()
            cin = features[0]
            for index, (cout, count) in enumerate(zip(features, blocks)):
                stride = 1 if index == 0 else 2
                self.stages.append(nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                                   for i in range(count)]))
                cin = cout
            self.ups = nn.ModuleList(nn.ConvTranspose3d(features[i + 1], features[i], 2, 2)
                                     for i in reversed(range(len(features) - 1)))
            self.decoders = nn.ModuleList(conv(2 * features[i], features[i]) for i in reversed(range(len(features) - 1)))
            self.head = nn.Conv3d(features[0], 1, 1)

        def forward(self, x):
            skips = []
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                skips.append(x)
            for up, decode, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
                x = decode(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return ResEncUNet()


# Assumed MFU and per-GPU batch. ViT-B: the 40% target (large dense matmuls). ResEnc-L: 3^3 convolutions
# with instance norms reach less; 30% is cross-checked in docs/scaling.md against nnU-Net's published ~35 h on one
# A100 for 250,000 iterations of batch 2. Batches: ViT-B as in SSL recipes at 96^3, ResEnc-L nnU-Net's 2 at 160^3.
WORKLOADS = {("vit_base", 96): (32, 0.40), ("vit_base", 160): (8, 0.40),
             ("resenc_l", 96): (8, 0.30), ("resenc_l", 160): (2, 0.30)}
BUILDERS = {"vit_base": vit_base, "resenc_l": resenc_l}


def workloads() -> list[Workload]:
    out = []
    for (name, side), (batch, mfu) in WORKLOADS.items():
        flops, parameters = count_flops(BUILDERS[name], side)
        out.append(Workload(name, side, batch, flops, parameters, mfu))
    return out


# ---- profile.json -------------------------------------------------------------------------------------------------
# The `raf profile` stage rows (profile.json "stages", engine/profile.py) the model reads, and the Machine field each
# sets: the loader's voxels/s per worker; on a CUDA profile also the measured all-reduce rate.
PROFILE_STAGES = {"patch sampling (1 worker)": ("voxels_per_s", "worker_voxels_per_s"),
                  "gradient all-reduce": ("mb_per_s", "inter_bytes_per_s")}


def parameters_from_profile(path: str | Path, machine: Machine) -> tuple[Machine, dict]:
    """The machine with the measured values of a profile.json replaced; also returns what was used. A CPU profile's
    all-reduce (gloo over loopback) says nothing of a GPU network and is not used."""
    profile = json.loads(Path(path).read_text())
    rows = {row.get("name"): row for row in profile.get("stages", [])}
    used = {}
    for stage, (key, field_name) in PROFILE_STAGES.items():
        value = rows.get(stage, {}).get(key)
        if not value or (field_name == "inter_bytes_per_s" and "cuda" not in str(profile.get("device", ""))):
            continue
        used[field_name] = float(value) * (1e6 if key == "mb_per_s" else 1.0)
    return replace(machine, **used), used


# ---- printing -----------------------------------------------------------------------------------------------------
def table(predictions: list[Prediction]) -> str:
    lines = [("| model | side | GPUs | batch/GPU | compute ms | all-reduce ms | exposed ms | step ms | samples/s | "
              "efficiency | workers needed/GPU | storage MB/s needed/GPU | bound |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p.workload} | {p.side} | {p.gpus} | {p.batch_per_gpu} | {p.compute_ms:.1f} | "
                     f"{p.allreduce_ms:.2f} | {p.exposed_comm_ms:.2f} | {p.step_ms:.1f} | {p.samples_per_s:,.0f} | "
                     f"{p.scaling_efficiency:.3f} | {p.workers_needed} | {p.storage_mb_per_s_needed:,.0f} | {p.bound} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Prediction]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="a `raf profile` profile.json whose measured parameters replace the defaults")
    parser.add_argument("--worker-voxels-per-s", type=float, help="loader voxels/s per worker (default: this box's)")
    parser.add_argument("--workers-per-gpu", type=int, help="loader workers each GPU gets (default 12)")
    parser.add_argument("--overlap", type=float, help="share of the backward pass the all-reduce hides behind (0-1)")
    parser.add_argument("--json", help="also write the predictions here")
    args = parser.parse_args(argv)
    machine, used = Machine(), {}
    if args.profile:
        machine, used = parameters_from_profile(args.profile, machine)
        print(f"from {args.profile}: {used or 'no model parameters found (defaults kept)'}")
    if args.worker_voxels_per_s:
        machine = replace(machine, worker_voxels_per_s=args.worker_voxels_per_s)
    if args.workers_per_gpu:
        machine = replace(machine, workers_per_gpu=args.workers_per_gpu)
    if args.overlap is not None:
        machine = replace(machine, overlap=args.overlap)
    print(f"machine: {machine}")
    predictions = []
    for workload in workloads():
        print(f"{workload.name} {workload.side}^3: {workload.flops_per_sample / 1e9:.0f} GFLOP per sample "
              f"(forward + backward), {workload.parameters / 1e6:.1f} M parameters, MFU {workload.mfu:.0%} assumed; "
              f"all-reduce exposed below a batch of {comm_bound_batch(workload, machine, 512) + 1} per GPU at 512 GPUs")
        predictions += [predict(workload, machine, gpus) for gpus in GPU_COUNTS]
    print(table(predictions))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(p) for p in predictions], indent=1))
    return predictions


if __name__ == "__main__":
    main()
