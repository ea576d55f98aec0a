"""How long one collective takes on a cluster's links: bandwidth and per-call latency per link class.

A rank's traffic in a collective over a group of consecutive ranks (`Link`: the group's size and
how many of its ranks share a node) splits into bytes over the in-node links and bytes over the
rank's network link (`link_bytes`). A ring over g ranks with r per node sends every byte it
receives over the in-node links and, when it spans nodes, 1/r of them over each rank's NIC (NCCL
runs one ring per NIC, so the node's r NICs carry the ring in parallel). An all-to-all sends each
peer's piece once: off-node pieces over the rank's own NIC.

Two link models:
  NCCL (default)  per call, the fastest of NCCL's Simple / LL128 / LL protocols in its ring tuning
                  model (src/graph/tuning.cc): base + in-node steps x NVLink hop + cross-node steps
                  x network hop, plus the slower link's bytes at that protocol's share of the bus
                  bandwidth. An all-to-all is charged one hop per peer (NCCL runs it as grouped
                  send/recv pairs, one per peer): 63 off-node hops for a 64-node qgZ exchange.
  calibrated      `Calibration`: per link class ("intra": the group sits on one node, "inter": it
                  spans nodes) and collective kind, a per-call latency and a bandwidth fitted on
                  measured calls (bytes = what one rank receives, this module's convention). The
                  emulated-cluster test (tests/test_step_time.py) fits gloo on `tc`-shaped links.
"""

from __future__ import annotations

import math
from typing import NamedTuple

GB = 1e9
INTRA_GBPS = 360.0  # NVLink 4: 450 GB/s per direction per GPU; NCCL reaches ~80% of it as bus bandwidth
INTER_GBPS = 40.0  # InfiniBand NDR 400 Gb/s = 50 GB/s per GPU's NIC; ~80% usable as bus bandwidth
PCIE_GBPS = 25.0  # host -> device copy of the cache rows (PCIe Gen5 x16 is 64 GB/s raw; pageable memory)
# NCCL's ring tuning model (src/graph/tuning.cc, Ring row of its tables), per protocol: latency in
# microseconds (base, per NVLink step, per network step) and the share of the bus bandwidth it
# reaches. NCCL picks, per call, the protocol with the least latency + bytes / bandwidth.
PROTOCOLS = {"simple": (8.4, 3.4, 9.6, 1.0), "ll128": (10.0, 1.9, 4.0, 0.92), "ll": (3.6, 0.47, 2.7, 0.25)}
RING_KINDS = ("all_gather", "reduce_scatter", "all_reduce")
KINDS = (*RING_KINDS, "all_to_all")


class Calibration(NamedTuple):
    """Measured link figures: {(class, kind): (seconds per call, bytes received per second)}.

    class is "intra" (the group on one node) or "inter" (it spans nodes); kind one of KINDS.
    `overlap`: whether prefetched parameter gathers hide under compute; `overlap_reduce`: whether the
    gradient reduction does too. NCCL on CUDA streams: both. gloo on CPU ranks (measured,
    tests/test_step_time.py): prefetched gathers run on gloo's threads while the main thread computes,
    the reduction blocks.
    """

    fits: dict
    overlap: bool = True
    overlap_reduce: bool = False
    source: str = "calibrated"


class Topology(NamedTuple):
    """Nodes x GPUs per node, the bus bandwidths (GB/s per GPU) of their links, or measured figures."""

    nodes: int
    gpus: int
    intra_gbps: float = INTRA_GBPS
    inter_gbps: float = INTER_GBPS
    calibration: Calibration | None = None

    @property
    def world(self) -> int:
        return self.nodes * self.gpus

    @property
    def overlap(self) -> bool:
        """Whether prefetched parameter gathers hide under compute (NCCL on side streams: yes)."""
        return self.calibration is None or self.calibration.overlap

    @property
    def overlap_reduce(self) -> bool:
        """Whether the gradient reduction hides under the backward (NCCL on side streams: yes)."""
        return self.calibration is None or self.calibration.overlap_reduce


class Link(NamedTuple):
    """A group of consecutive ranks and how it sits on the nodes (blocks of `per_node` ranks)."""

    group: int
    per_node: int

    @property
    def nodes(self) -> int:
        return -(-self.group // self.per_node)


class Traffic(NamedTuple):
    """One collective class in one micro-batch (or once per step): bytes one rank receives, calls, link."""

    name: str
    received: float
    calls: float
    link: Link
    kind: str  # one of KINDS, or "host" (a host -> device copy)
    phase: str  # "fwd" / "bwd": overlaps that pass's compute; "sae", "step": on the critical path
    micro: int  # the micro-batch it belongs to; -1: once per step


def link_bytes(t: Traffic) -> tuple[float, float]:
    """(bytes over the rank's in-node links, bytes over its network link) of a traffic record."""
    link = t.link
    if t.kind == "host" or link.group <= 1:
        return 0.0, 0.0
    if t.kind in RING_KINDS:
        return (t.received if link.per_node > 1 else 0.0), (t.received / link.per_node if link.nodes > 1 else 0.0)
    piece = t.received / (link.group - 1)
    return piece * (link.per_node - 1), piece * (link.group - link.per_node)


def seconds(t: Traffic, topo: Topology) -> float:
    """Time of a traffic record on these links (all its calls)."""
    if t.kind == "host":
        return t.received / (PCIE_GBPS * GB)
    if t.link.group <= 1 or t.calls == 0:
        return 0.0
    if topo.calibration is not None:
        lat, bw = topo.calibration.fits[("inter" if t.link.nodes > 1 else "intra", t.kind)]
        return t.calls * lat + t.received / bw
    nvlink, nic = (b / t.calls for b in link_bytes(t))
    nodes, per_node = t.link.nodes, t.link.per_node
    best = math.inf
    for base, nvl_hop, net_hop, share in PROTOCOLS.values():
        if t.kind in RING_KINDS:  # g-1 steps round the ring, nodes-1 of them cross to another node
            steps = 2 if t.kind == "all_reduce" else 1  # reduce-scatter then all-gather
            lat = base + steps * ((t.link.group - nodes) * nvl_hop + (nodes - 1) * net_hop)
        else:  # one send/recv pair per peer: in-node peers over NVLink, the rest over the network
            lat = base + (min(per_node, t.link.group) - 1) * nvl_hop + (t.link.group - per_node) * net_hop
        wire = max(nvlink / (topo.intra_gbps * GB * share), nic / (topo.inter_gbps * GB * share))
        best = min(best, lat * 1e-6 + wire)
    return t.calls * best


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Per-call latency and bandwidth from measured calls: [(bytes received, seconds), ...].

    The latency is the smallest message's time (its bytes take next to none); the bandwidth is the
    least-squares slope of the extra seconds over the extra bytes of the larger messages, through
    that point. Returns (latency s, bandwidth bytes/s); no measurable slope gives an infinite bandwidth.
    """
    b0, lat = min(points)
    rest = [(b - b0, s - lat) for b, s in points if b > b0]
    sxy = sum(b * s for b, s in rest)
    return lat, (sum(b * b for b, _ in rest) / sxy if sxy > 0 else math.inf)
