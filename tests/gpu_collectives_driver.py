"""One rank: the sharded encoder's collectives on the accelerator's backend (NCCL on CUDA). Writes JSON to argv[1].

Run by tests/test_gpu.py in its own process, so no process group outlives it. Each check runs
the collective as the encoder calls it (deepspeed.comm, the encoder's group) and compares with
what one rank must get: its own tensor back, and the identity as the gradient.
"""

import json
import sys

import torch


def main(path: str) -> None:
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator

    from fpo_ds import dist, encoder, train

    dist.init(2)
    device = get_accelerator().current_device_name()
    group = dist.Group((0,), 0, None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g).to(device).requires_grad_(True)
    checks = {}
    gathered = encoder._Collective.apply(x, group, "gather")  # (1, 7, 5)
    checks["gather"] = gathered.shape == (1, 7, 5) and torch.equal(gathered[0], x)
    w = torch.randn(1, 7, 5, generator=g).to(device)
    (gathered * w).sum().backward()
    checks["gather_grad"] = torch.equal(x.grad, w[0])
    y = torch.randn(1, 3, 4, generator=g).to(device).requires_grad_(True)
    swapped = encoder._Collective.apply(y, group, "exchange")
    checks["exchange"] = torch.equal(swapped, y)
    v = torch.randn(1, 3, 4, generator=g).to(device)
    (swapped * v).sum().backward()
    checks["exchange_grad"] = torch.equal(y.grad, v)
    top = torch.randn(6, 3, generator=g).to(device)
    checks["topk_gather"] = torch.equal(encoder._gather(top, group, encoder.TOPK_LOG)[0], top)
    enc = encoder.ShardedEncoder.__new__(encoder.ShardedEncoder)  # _n_max reads only the group
    enc.group = group
    checks["n_max"] = enc._n_max(11, device) == 11
    checks["any_rank"] = train._any_rank(device, torch.tensor(True, device=device), False) == [True, False]
    torch.cuda.synchronize() if device.startswith("cuda") else None
    with open(path, "w") as f:
        json.dump({"backend": tdist.get_backend(), "device": device, "checks": checks}, f)
    dist.shutdown(0)


if __name__ == "__main__":
    main(sys.argv[1])
