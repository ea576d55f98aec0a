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
    return torch.cat([batch.input_ids.unsqueeze(-1).float(), batch.attention_mask.unsqueeze(-1).float(), logits.float()], -1)


def main(spec_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    results = {}
    for item in json.loads(Path(spec_path).read_text()):
        recipe = C.load(item["recipe"], item.get("overrides", []))
        if item["action"] == "build_cache":
            cache.build(recipe)
            results[item["name"]] = {"ok": True}
            continue
        history, s = train.run(recipe)
        results[item["name"]] = {"history": history, "reference": type(s.reference).__name__}
        if item["action"] == "train+dump":
            state = gathered_state(s.engine)
            logits = fixed_logits(s)
            if dist.rank() == 0:
                torch.save({"state": state, "logits": logits}, out / f"{item['name']}.pt")
        del s
    if dist.rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
