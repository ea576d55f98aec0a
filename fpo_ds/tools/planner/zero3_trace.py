"""Which parameter all-gathers ZeRO-3 issues in one forward and backward, simulated on a module call tree.

A mirror of DeepSpeed 0.19.8's PartitionedParameterCoordinator (runtime/zero/
partitioned_param_coordinator.py) in steady state, i.e. once the first forward and backward have
recorded the module trace. It reproduces, call for call, the all_gather_into_tensor byte totals
and call counts DeepSpeed's comms logger records on 2- and 3-rank CPU runs of a 4-layer model
under prefetch buckets, reuse distances, live-parameter limits and persistence thresholds from
0 to the defaults, with and without activation checkpointing.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

Event = tuple[str, str, tuple[int, ...]]  # ("fetch" | "release", "fwd" | "bwd", parameter indices)


def persistent(numels: tuple[int, ...], threshold: int, model_threshold: int) -> tuple[bool, ...]:
    """DeepSpeed's rule: parameters of at most stage3_param_persistence_threshold elements stay whole.

    In creation order, while the persisted total stays within stage3_model_persistence_threshold.
    Persistent parameters are never fetched; they are all-gathered once after each optimizer step.
    """
    out, kept = [], 0
    for n in numels:
        keep = n <= threshold and kept + n <= model_threshold
        kept += n if keep else 0
        out.append(keep)
    return tuple(out)


def module_trace(call, checkpointing: bool, backward: bool = True) -> list[Event]:
    """ZeRO-3's hook events for one forward (+ backward), in the order DeepSpeed's hooks fire.

    Forward fetches a module before its call and releases it after. Backward fetches a module
    when its output's gradient arrives (reverse order, a module before its children) and releases
    it after its backward. A checkpointed decoder layer's backward first fetches its last child,
    then re-runs the layer's forward, which stops as soon as the last saved tensor is rebuilt
    (torch's non-reentrant checkpoint): the last module of the re-run is fetched, never released.
    """
    fwd = _forward(call, "fwd")
    return fwd + _backward(call, checkpointing) if backward else fwd


def _forward(call, phase: str, cut: bool = False) -> list[Event]:
    """Forward events of a call; `cut`: the re-run stops inside this call's last module (no releases)."""
    out = [("fetch", phase, call.params)]
    for i, child in enumerate(call.children):
        out += _forward(child, phase, cut and i == len(call.children) - 1)
    return out if cut else out + [("release", phase, call.params)]


def _backward(call, checkpointing: bool) -> list[Event]:
    out = [("fetch", "bwd", call.params)]
    children = list(call.children)
    if checkpointing and call.checkpointed and children:
        last = children.pop()
        out.append(("fetch", "bwd", last.params))  # its gradient arrives before the re-run starts
        for child in children:
            out += _forward(child, "bwd")
        out += _forward(last, "bwd", cut=True)
        for grandchild in reversed(last.children):
            out += _backward(grandchild, checkpointing)
        out.append(("release", "bwd", last.params))
    for child in reversed(children):
        out += _backward(child, checkpointing)
    return out + [("release", "bwd", call.params)]


@lru_cache(maxsize=32)
def fetch_calls(forward_call, numels: tuple[int, ...], persist: tuple[bool, ...], knobs: tuple, backward: bool):
    """The all-gather calls of one pass: ((pass, parameter indices), ...). Cached: the planner asks often.

    `knobs` = (checkpointing, stage3_prefetch_bucket_size, stage3_max_live_parameters,
    stage3_max_reuse_distance).
    """
    checkpointing, *limits = knobs
    return tuple(simulate_fetches(module_trace(forward_call, checkpointing, backward), numels, persist, *limits))


def simulate_fetches(trace: list[Event], numels, persist, prefetch: int, max_live: int, reuse: int) -> list:
    """The parameter all-gathers of one pass in steady state: [(pass, params), ...], one per call.

    At each fetch: gather the module's missing parameters (one call), pop its entries from the
    trace queue, then prefetch the next entries in one call until min(prefetch, max_live -
    gathered elements) are on their way; entries popped for parameters already present mark a
    later use. At each release: free the module's parameters unless persistent, marked for a
    later use, or used again within `reuse` elements of the fetch order after this point.
    """
    fetches = [ps for kind, _, ps in trace if kind == "fetch"]
    queue = deque((p, step) for step, ps in enumerate(fetches) for p in sorted(set(ps)))
    present: set[int] = set()
    marked: dict[int, int] = {}
    live, calls, step = 0, [], 0
    for kind, phase, ps in trace:
        if kind == "release":
            gone = _released(fetches, step, ps, marked, persist, numels, reuse) & present
            present -= gone
            live -= sum(numels[p] for p in gone)
            continue
        live += _issue(calls, phase, sorted(p for p in set(ps) if not persist[p] and p not in present), present, numels)
        own = {p for p in ps if marked.get(p, -1) < step}
        popped: set[int] = set()
        while queue and len(popped) < len(own):
            p, at = queue.popleft()
            marked[p] = at
            popped.add(p)
        ahead = _prefetch(queue, marked, present, persist, numels, min(prefetch, max_live - live))
        live += _issue(calls, phase, ahead, present, numels)
        step += 1
    return calls


def _issue(calls: list, phase: str, params: list[int], present: set, numels) -> int:
    """Record one all-gather call of `params` (if any); returns the elements it brings."""
    if not params:
        return 0
    calls.append((phase, tuple(params)))
    present.update(params)
    return sum(numels[p] for p in params)


def _prefetch(queue: deque, marked: dict, present: set, persist, numels, budget: int) -> list[int]:
    """Pop trace entries until `budget` elements of absent parameters are chosen to gather."""
    ahead: list[int] = []
    got = 0
    while queue and got < budget:
        p, at = queue.popleft()
        marked[p] = max(marked.get(p, -1), at)
        if not persist[p] and p not in present and p not in ahead:
            ahead.append(p)
            got += numels[p]
    return ahead


def _released(fetches: list, step: int, ps: tuple, marked: dict, persist, numels, reuse: int) -> set[int]:
    """Parameters freed at a release after `step` fetches: not persistent, not marked later, not reused soon."""
    out = {p for p in ps if not persist[p] and marked.get(p, -1) <= step}
    seen = 0
    for later in fetches[step:]:
        if seen >= reuse or not out:
            break
        for p in later:
            out.discard(p)
            seen += numels[p]
    return out
