"""Hardware presets: per-GPU memory tiers, links and compute, with cited public specs.

Every preset describes one system (an 8-GPU node or an NVL72 rack) per GPU: HBM, the
host DRAM share and its link into the GPU, local NVMe, the NIC (which feeds a remote
tier), and dense BF16 tensor FLOP/s. Vendor figures are used as published (peak, one
direction where it matters); anything not published is marked ``assumed`` or
``estimate`` in ``notes`` and in the comment beside it, so a reader can swap it. Latencies
are order-of-magnitude assumptions (a DMA setup, an NVMe read, an RDMA round trip); they
only matter for small reads. This module knows nothing about models or workloads.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvfactory.errors import ConfigError

GB = 1e9
TB = 1e12
PCIE5_X16 = 64 * GB  # PCIe 5.0 x16: 32 GT/s x 16 lanes, ~64 GB/s per direction (PCI-SIG)
CX7_400G = 400e9 / 8  # ConnectX-7, 400 Gb/s per GPU
GEN4_U2_READ = 6.5 * GB  # assumed sequential read of one PCIe 4.0 U.2 data-cache drive
GEN5_E1S_READ = 12 * GB  # assumed sequential read of one PCIe 5.0 E1.S drive
DRAM_LATENCY = 10e-6  # assumed: DMA setup over PCIe / C2C
NVME_LATENCY = 100e-6  # assumed: one NVMe read
REMOTE_LATENCY = 30e-6  # assumed: RDMA round trip plus software


@dataclass(frozen=True, slots=True)
class MemoryTier:
    """One place KV can live, per GPU: capacity, read bandwidth into HBM, latency."""

    name: str
    capacity_bytes_per_gpu: float
    read_bytes_per_s_per_gpu: float
    latency_s: float
    usable_fraction: float = 0.9
    """Share of the capacity a KV store may use (the rest: OS, activations, other data)."""


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    name: str
    description: str
    gpus: int
    bf16_dense_flops_per_gpu: float
    tiers: tuple[MemoryTier, ...]
    """Fastest first; the first is HBM, whose capacity also holds the weights."""
    sources: tuple[str, ...]
    notes: str = ""

    def tier(self, name: str) -> MemoryTier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ConfigError(
            f"hardware {self.name!r} has no tier {name!r}; tiers: "
            + ", ".join(t.name for t in self.tiers)
        )


def _node_tiers(
    hbm: float, hbm_bw: float, dram: float, link: float, nvme: float, nvme_bw: float, nic: float
) -> tuple[MemoryTier, ...]:
    return (
        MemoryTier("hbm", hbm, hbm_bw, 0.0),
        MemoryTier("dram", dram, link, DRAM_LATENCY, usable_fraction=0.8),
        MemoryTier("nvme", nvme, nvme_bw, NVME_LATENCY),
        # Capacity of a remote tier is not a property of the node: the planner takes it as
        # input; the NIC bounds how fast it refills HBM.
        MemoryTier("remote", 0.0, nic, REMOTE_LATENCY, usable_fraction=1.0),
    )


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec(
        name="h100",
        description="DGX/HGX H100 SXM, 8 GPUs",
        gpus=8,
        bf16_dense_flops_per_gpu=989e12,  # 1,979 TFLOPS BF16 with sparsity, halved
        # 80 GB HBM3 at 3.35 TB/s; 2 TB DDR5 per node; 8 x 3.84 TB U.2 data cache (Gen4);
        # 8 x ConnectX-7 400 Gb/s; host link PCIe Gen5 x16.
        tiers=_node_tiers(
            80 * GB, 3.35 * TB, 2 * TB / 8, PCIE5_X16, 3.84 * TB, GEN4_U2_READ, CX7_400G
        ),
        sources=(
            "https://www.nvidia.com/en-us/data-center/h100/",
            "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html",
        ),
        notes="NVMe read per drive assumed (6.5 GB/s, Gen4 U.2); latencies assumed",
    ),
    "h200": HardwareSpec(
        name="h200",
        description="DGX/HGX H200 SXM, 8 GPUs",
        gpus=8,
        bf16_dense_flops_per_gpu=989e12,  # same Hopper compute as H100 SXM
        # 141 GB HBM3e at 4.8 TB/s; DGX H200: 2 TB DDR5, 8 x 3.84 TB U.2, 8 x ConnectX-7.
        tiers=_node_tiers(
            141 * GB, 4.8 * TB, 2 * TB / 8, PCIE5_X16, 3.84 * TB, GEN4_U2_READ, CX7_400G
        ),
        sources=(
            "https://www.nvidia.com/en-us/data-center/h200/",
            "https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-"
            "foundation-enterprise-ai/latest/core-components.html",
        ),
        notes="NVMe read per drive assumed (6.5 GB/s, Gen4 U.2); latencies assumed",
    ),
    "b200": HardwareSpec(
        name="b200",
        description="DGX/HGX B200, 8 GPUs",
        gpus=8,
        bf16_dense_flops_per_gpu=2.25e15,  # HGX B200: 36 PFLOPS FP16/BF16 sparse per 8 GPUs
        # DGX B200: 1,440 GB HBM3e (180 GB/GPU), 64 TB/s (8 TB/s/GPU); 2 TB DDR5 (to 4 TB);
        # 8 x 3.84 TB U.2; 8 x ConnectX-7 400 Gb/s; Xeon 8570 hosts on PCIe Gen5.
        tiers=_node_tiers(
            180 * GB, 8 * TB, 2 * TB / 8, PCIE5_X16, 3.84 * TB, GEN4_U2_READ, CX7_400G
        ),
        sources=(
            "https://www.nvidia.com/en-us/data-center/dgx-b200/",
            "https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-dgxb200.html",
        ),
        notes="NVMe read per drive assumed (6.5 GB/s); latencies assumed",
    ),
    "gb200-nvl72": HardwareSpec(
        name="gb200-nvl72",
        description="GB200 NVL72 rack: 72 Blackwell GPUs, 36 Grace CPUs",
        gpus=72,
        bf16_dense_flops_per_gpu=2.5e15,  # 360 PFLOPS FP16/BF16 sparse per rack, /72, halved
        # Up to 13.4 TB HBM3e (186 GB/GPU) at 576 TB/s (8 TB/s/GPU); up to 17 TB LPDDR5X
        # (236 GB/GPU); NVLink-C2C 900 GB/s per Grace (both directions, two GPUs), so about
        # 225 GB/s one way per GPU (estimate); ConnectX-7 400 Gb/s per GPU.
        tiers=_node_tiers(
            186 * GB, 8 * TB, 17 * TB / 72, 225 * GB, 7.68 * TB, GEN5_E1S_READ, CX7_400G
        ),
        sources=("https://www.nvidia.com/en-us/data-center/gb200-nvl72/",),
        notes=(
            "C2C share per GPU is an estimate; NVMe (one 7.68 TB Gen5 E1.S per GPU, "
            "12 GB/s) assumed; latencies assumed"
        ),
    ),
    "vera-rubin-nvl72": HardwareSpec(
        name="vera-rubin-nvl72",
        description="Vera Rubin NVL72 as announced (CES 2026): 72 Rubin GPUs, 36 Vera CPUs",
        gpus=72,
        # Not published as announced: NVFP4 training 35 PFLOPS / 4, the FP4:BF16 dense ratio
        # of Blackwell (B200: 9 vs 2.25 PFLOPS). An estimate.
        bf16_dense_flops_per_gpu=8.75e15,
        # 288 GB HBM4 at 22 TB/s per GPU; Vera: up to 1.5 TB LPDDR5X each (54 TB per rack,
        # 750 GB/GPU) over NVLink-C2C 1.8 TB/s (both directions, two GPUs: ~450 GB/s one
        # way per GPU, estimate); ConnectX-9 1.6 Tb/s per GPU.
        tiers=_node_tiers(
            288 * GB, 22 * TB, 54 * TB / 72, 450 * GB, 7.68 * TB, GEN5_E1S_READ, 1.6e12 / 8
        ),
        sources=(
            "https://nvidianews.nvidia.com/news/rubin-platform-ai-supercomputer",
            "https://www.nvidia.com/en-us/data-center/vera-rubin-nvl72/",
        ),
        notes=(
            "announced specs, subject to change; BF16 FLOP/s and C2C share per GPU are "
            "estimates; NVMe assumed (7.68 TB Gen5 E1.S per GPU, 12 GB/s); latencies assumed"
        ),
    ),
}
"""Hardware presets by name."""


def resolve_hardware(name: str) -> HardwareSpec:
    """A preset by (case-insensitive) name; ``ConfigError`` lists the valid ones."""
    spec = HARDWARE_PRESETS.get(name.lower())
    if spec is None:
        raise ConfigError(
            f"unknown hardware {name!r}; presets: {', '.join(sorted(HARDWARE_PRESETS))}"
        )
    return spec


__all__ = ["GB", "HARDWARE_PRESETS", "TB", "HardwareSpec", "MemoryTier", "resolve_hardware"]
