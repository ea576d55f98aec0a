"""Runs several recipes in one multi-process launch (amortises ~15 s of start-up per launch).

    torchrun --nproc_per_node 2 tests/mp_driver.py SPEC.json OUT_DIR

SPEC.json: list of {"name", "recipe", "overrides", "action"} where action is "train",
"build_cache" or "train+dump" (train, then gather weights and logits on a fixed batch).
Rank 0 writes OUT_DIR/results.json and OUT_DIR/<name>.pt. Assertions live in the tests.
"""

import json
import sys
from pathlib import Path

import deepspeed
import sae_lens  # noqa: F401  (must precede any zero.Init in this process, as in fpo_ds.train)
import torch

from fpo_ds import cache, data, dist, train
from fpo_ds import config as C


def gathered_state(engine) -> dict:
    """Full weights read inside GatheredParameters, entered by every rank (never placeholders)."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in params.items()}


def fixed_logits(s) -> torch.Tensor:
    batch = data.collate(s.pairs[:2], s.tokenizer.pad_token_id)
    s.engine.eval()
    with torch.no_grad():
        logits = s.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.cat(
        [batch.input_ids.unsqueeze(-1).float(), batch.attention_mask.unsqueeze(-1).float(), logits.float()], -1
    )


def main(spec_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    results = {}
    dist.init(3)
    for item in json.loads(Path(spec_path).read_text()):
        recipe = C.load(item["recipe"], item.get("overrides", []))
        if item["action"] == "zero_init_check":
            results[item["name"]] = zero_init_check(recipe)
            continue
        if item["action"] == "sae_check":
            results[item["name"]] = sae_check(out)
            continue
        if item["action"] == "build_cache":
            cache.build(recipe)
            results[item["name"]] = {"ok": True}
            continue
        history, s, _ = train.run(recipe)
        results[item["name"]] = {"history": history, "reference": type(s.reference).__name__}
        if item["action"] == "train+dump":
            state = gathered_state(s.engine)
            logits = fixed_logits(s)
            if dist.rank() == 0:
                torch.save({"state": state, "logits": logits}, out / f"{item['name']}.pt")
        del s
    if dist.rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


def zero_init_check(recipe) -> dict:
    """Under ZeRO-3 the loaded model holds only partition placeholders on every rank."""
    from fpo_ds import model as M

    ds_cfg = M.deepspeed_config(recipe.deepspeed.config, 4, 1, dist.world_size())
    model, keep = M.load_model(recipe.model, ds_cfg)
    local = sum(p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", 0) for p in model.parameters())
    gathered = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, {"local_numel": local, "ds_numel": full})
    del keep
    return {"per_rank": gathered}


def sae_check(out: Path) -> dict:
    """Sharded encode vs sae-lens's own encode on the full SAE, forward and gradients."""
    from fpo_ds import losses
    from fpo_ds.sae import ShardedEncoder
    from fpo_ds.tools import toy

    res = {}
    rank, world = dist.rank(), dist.world_size()
    for arch, extra in (
        ("standard", {}),
        ("jumprelu", {}),
        ("topk", {"k": 7}),
        ("topk", {"k": 7, "rescale_acts_by_decoder_norm": True}),
        ("standard", {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False}),
    ):
        name = arch + ("-ln" if "normalize_activations" in extra else "")
        name += "-dn" if "rescale_acts_by_decoder_norm" in extra else ""
        sae = toy.random_sae(arch, 16, 37, 1, seed=3, **extra)  # 37 features: uneven split across ranks
        enc = ShardedEncoder(sae, rank, world)
        g = torch.Generator().manual_seed(100 + rank)
        t = 5 + 2 * rank  # ranks hold different sequence lengths
        h = torch.randn(4, t, 16, generator=g, dtype=torch.float32, requires_grad=True)
        mask = torch.rand(4, t, generator=g) > 0.4
        mask[:, -1] = True
        w = torch.randn(4, 37, generator=g)
        got = enc.pooled(h, mask)
        (got * w).sum().backward()
        counts = [None] * world  # the trainer knows every rank's count from the data; here, ask
        torch.distributed.all_gather_object(counts, int(mask.sum()))
        # Padding beyond the largest count changes nothing either (padding rows are dropped).
        same = all(torch.equal(enc.pooled(h.detach(), mask, n), got.detach()) for n in (max(counts), max(counts) + 3))
        h2 = h.detach().clone().requires_grad_(True)
        want = losses.masked_mean(sae.encode(h2), mask)
        (want * w).sum().backward()
        errs = torch.tensor(
            [(got - want).abs().max().item(), (h.grad - h2.grad).abs().max().item(), float(want.abs().sum() > 0)]
        )
        full = sum(p.numel() * p.element_size() for p in sae.parameters())
        res[name] = {
            "fwd_err": errs[0].item(),
            "grad_err": errs[1].item(),
            "nonzero": errs[2].item(),
            "n_max_given_equal": same,
            "resident_bytes": enc.resident_bytes(),
            "full_bytes": full,
            "encoder_bytes": sum(sae.get_parameter(n).numel() * 4 for n in ("W_enc", "b_enc", "b_dec")),
            "comm_bytes": enc.bytes_per_call,
        }
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    # bf16 hidden states with more rows than bf16 counts exactly (256): row ids must stay exact.
    enc = ShardedEncoder(toy.random_sae("standard", 16, 37, 1, seed=3), rank, world)
    hb = torch.randn(300, 2, 16, generator=torch.Generator().manual_seed(7 + rank)).to(torch.bfloat16)
    mb = torch.ones(300, 2, dtype=torch.bool)
    err = (enc.pooled(hb, mb) - enc.pooled(hb.float(), mb)).abs().max().item()
    return {"per_rank": gathered, "bf16_many_rows_err": err}


if __name__ == "__main__":
    main(*sys.argv[1:])
