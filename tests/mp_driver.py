"""Runs several pipeline stages and checks in one multi-process launch (start-up costs ~15 s each).

    launched by pipeline.torchrun: tests/mp_driver.py SPEC.json OUT_DIR

SPEC.json: a list of pipeline stages ({"stage": "train" | "build-cache", "recipe", "overrides"})
with a "name", run by fpo_ds.pipeline.run_stage exactly as `fpo-ds` runs them; a train stage
may add "dump": true (then gather weights and logits on a fixed batch). Items with "check"
instead run a test-only check ("sae", "zero_init", "comms", "damage_tokenized"). Rank 0 writes OUT_DIR/results.json
and OUT_DIR/<name>.pt. Assertions live in the tests.
"""

import json
import sys
from pathlib import Path

from fpo_ds import components

components.import_sae_lens()  # as fpo_ds.pipeline does before the first stage's zero.Init

import deepspeed  # noqa: E402
import torch  # noqa: E402

from fpo_ds import config as C  # noqa: E402
from fpo_ds import data, dist, pipeline  # noqa: E402


def gathered_state(engine) -> dict:
    """Full weights read inside GatheredParameters, entered by every rank (never placeholders)."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in params.items()}


def fixed_logits(c) -> torch.Tensor:
    batch = data.collate(c.pairs[:2], c.tokenizer.pad_token_id)
    c.policy.eval()
    with torch.no_grad():
        logits = c.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.cat(
        [batch.input_ids.unsqueeze(-1).float(), batch.attention_mask.unsqueeze(-1).float(), logits.float()], -1
    )


def comms_summary() -> dict:
    """DeepSpeed's comms logger records on this rank: {op name: total message bytes, count}."""
    import deepspeed.comm as dcomm

    out = {}
    for name, sizes in dcomm.comms_logger.comms_dict.items():
        count = sum(rec[0] for rec in sizes.values())
        out[name] = {"bytes": sum(size * rec[0] for size, rec in sizes.items()), "count": count}
    dcomm.comms_logger.comms_dict.clear()
    return out


def _totals() -> dict:
    import deepspeed.comm as dcomm

    logged = dcomm.comms_logger.comms_dict.items()
    return {name: sum(size * rec[0] for size, rec in sizes.items()) for name, sizes in logged}


def record_steps(snapshots: list):
    """Snapshot the comms logger's totals after every optimizer step (wraps train.train_step); returns an undo."""
    from fpo_ds import train

    original = train.train_step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        snapshots.append(_totals())
        return out

    train.train_step = step
    return lambda: setattr(train, "train_step", original)


def main(spec_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    results = {}
    dist.init(3)
    for item in json.loads(Path(spec_path).read_text()):
        if item.get("check") == "zero_init":
            results[item["name"]] = zero_init_check(C.load(item["recipe"]))
            continue
        if item.get("check") == "damage_tokenized":
            results[item["name"]] = damage_tokenized(item["dir"])
            continue
        if item.get("check") == "sae":
            results[item["name"]] = sae_check(item.get("groups", ["none", "world"]))
            continue
        snapshots: list = []
        undo = record_steps(snapshots) if item.get("comms") else (lambda: None)
        result = pipeline.run_stage(item)
        undo()
        if item["stage"] == "build-cache":
            results[item["name"]] = {"ok": True, "comms": comms_summary()}
            continue
        history, c = result.history, result.components
        results[item["name"]] = {"history": history, "reference": type(c.reference).__name__, "n_pairs": len(c.pairs)}
        if item.get("comms"):
            gathered = [None] * dist.world_size()
            torch.distributed.all_gather_object(gathered, (comms_summary(), snapshots))
            results[item["name"]]["comms"] = [g[0] for g in gathered]
            results[item["name"]]["comms_steps"] = [g[1] for g in gathered]
        if item.get("dump"):
            state = gathered_state(c.policy)
            logits = fixed_logits(c)
            if dist.rank() == 0:
                torch.save({"state": state, "logits": logits}, out / f"{item['name']}.pt")
        del c
    if dist.rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


def damage_tokenized(directory: str) -> dict:
    """Rank 0 flips one byte in the middle of every tokenized set's data files (same size); all wait."""
    damaged = []
    if dist.rank() == 0:
        for arrow in sorted(Path(directory).glob("fpo_ds-tokenized/*/*.arrow")):
            raw = bytearray(arrow.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            arrow.write_bytes(bytes(raw))
            damaged.append(str(arrow))
    torch.distributed.barrier()
    return {"damaged": damaged}


def zero_init_check(recipe) -> dict:
    """Under ZeRO-3 the loaded model holds only partition placeholders on every rank."""
    from fpo_ds import ds_config
    from fpo_ds import model as M

    ds_cfg = ds_config.build(recipe.deepspeed.config, 4, 1, dist.world_size())
    model, keep = M.load_model(recipe.model, ds_cfg)
    local = sum(p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", 0) for p in model.parameters())
    gathered = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, {"local_numel": local, "ds_numel": full})
    del keep
    return {"per_rank": gathered}


VARIANTS = (
    ("standard", {}),
    ("jumprelu", {}),
    ("topk", {"k": 7}),
    ("topk", {"k": 7, "rescale_acts_by_decoder_norm": True}),
    ("standard", {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False}),
)


def _variant_name(arch: str, extra: dict) -> str:
    name = arch + ("-ln" if "normalize_activations" in extra else "")
    return name + ("-dn" if "rescale_acts_by_decoder_norm" in extra else "")


def sae_check(groups: list) -> dict:
    """Sharded encode vs sae-lens's own encode on the full SAE, forward and gradients, per shard group."""
    from fpo_ds import losses
    from fpo_ds.encoder import ShardedEncoder
    from fpo_ds.tools.demo import toy

    res = {}
    rank, world = dist.rank(), dist.world_size()
    for spec in groups:
        group = dist.block_groups(spec)
        for arch, extra in VARIANTS:
            sae = toy.random_sae(arch, 16, 37, 1, seed=3, **extra)  # 37 features: uneven split across ranks
            enc = ShardedEncoder(sae, group)
            g = torch.Generator().manual_seed(100 + rank)
            t = 5 + 2 * rank  # ranks hold different sequence lengths
            h = torch.randn(4, t, 16, generator=g, dtype=torch.float32, requires_grad=True)
            mask = torch.rand(4, t, generator=g) > 0.4
            mask[:, -1] = True
            w = torch.randn(4, 37, generator=g)
            got = enc.pooled(h, mask)
            (got.features * w).sum().backward()
            counts = [None] * world  # the trainer knows every rank's count from the data; here, ask
            torch.distributed.all_gather_object(counts, int(mask.sum()))
            n_group = max(counts[r] for r in group.ranks)
            # Padding beyond the group's largest count changes nothing either (padding rows are dropped;
            # only the matmul's blocking, which depends on the row count, may round differently).
            same = all(
                torch.allclose(enc.pooled(h.detach(), mask, n).features, got.features.detach(), atol=1e-6, rtol=0)
                for n in (n_group, n_group + 3)
            )
            h2 = h.detach().clone().requires_grad_(True)
            want = losses.masked_mean(sae.encode(h2), mask)
            (want * w).sum().backward()
            res[f"{spec}/{_variant_name(arch, extra)}"] = {
                "group_size": group.size,
                "fwd_err": (got.features - want).abs().max().item(),
                "grad_err": (h.grad - h2.grad).abs().max().item(),
                "nonzero": float(want.abs().sum() > 0),
                "n_max_given_equal": same,
                "resident_bytes": enc.resident_bytes(),
                "encoder_bytes": sum(sae.get_parameter(n).numel() * 4 for n in ("W_enc", "b_enc", "b_dec")),
                "comm_bytes": got.comm_bytes,
            }
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    # bf16 hidden states with more rows than bf16 counts exactly (256): row ids must stay exact.
    enc = ShardedEncoder(toy.random_sae("standard", 16, 37, 1, seed=3), dist.block_groups("world"))
    hb = torch.randn(300, 2, 16, generator=torch.Generator().manual_seed(7 + rank)).to(torch.bfloat16)
    mb = torch.ones(300, 2, dtype=torch.bool)
    err = (enc.pooled(hb, mb).features - enc.pooled(hb.float(), mb).features).abs().max().item()
    return {"per_rank": gathered, "bf16_many_rows_err": err}


if __name__ == "__main__":
    main(*sys.argv[1:])
