"""Response log-probs under ZeRO-3 on 2 ranks, every parameter partitioned (the LM heads included).

    launched by pipeline.torchrun: tests/logps_mp_driver.py POLICY_DIR REFERENCE_DIR OUT.pt

Builds the policy engine (ResponseLM, torch AdamW at lr 0, so steps leave the weights alone) and a
frozen reference engine, both ZeRO-3 with stage3_param_persistence_threshold 0. Every rank runs
the same batch, so the reduced gradient equals one process's. Per method (simpo, tdpo1) and
iteration: the loss, the full gradients (safe_get_full_grad), and how often each LM head weight
was all-gathered in the reference forward, the policy forward and the backward (a coordinator
fetch or a GatheredParameters entry that includes it). Rank 0 saves them
with the batch; the test computes the single-process full-logits oracle.
"""

import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from fpo_ds import data, dist
from fpo_ds import losses as L
from fpo_ds import model as M
from fpo_ds import objective as O
from fpo_ds.config import LossConfig, ModelConfig

DS = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_batch_size": 2,
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


class GatherCounter:
    """Counts outermost all-gathers (coordinator fetches and GatheredParameters) that include `targets`."""

    def __init__(self, params, targets: dict):
        self.targets, self.depth = targets, 0
        self.counts = {name: 0 for name in targets}
        for p in params:
            p.all_gather = self._wrap(p.all_gather, lambda a, kw, p=p: kw.get("param_list") or (a[0] if a else [p]))
            p.all_gather_coalesced = self._wrap(p.all_gather_coalesced, lambda a, kw: a[0] if a else kw["params"])

    def _wrap(self, fn, params_of):
        def wrapped(*args, **kwargs):
            if self.depth == 0:
                ids = {id(q) for q in params_of(args, kwargs)}
                for name, t in self.targets.items():
                    self.counts[name] += id(t) in ids
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapped

    def take(self) -> dict:
        out, self.counts = self.counts, {name: 0 for name in self.targets}
        return out


def main(policy_dir: str, ref_dir: str, out_path: str) -> None:
    dist.init(3)
    L.LOGIT_CHUNK = 3  # 14 response positions: 5 chunks, so a per-chunk gather would show
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    pairs = [data.Pair(i, [1, 5 + i, 9, 12], [20 + i, 31, 40, 2], [33, 21 + i, 2]) for i in range(2)]
    batch = data.collate(pairs, tok.pad_token_id)
    lm, keep = M.load_model(ModelConfig(name_or_path=policy_dir), DS)
    opt = torch.optim.AdamW(lm.parameters(), lr=0.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=M.ResponseLM(lm), optimizer=opt, config=DS)
    del keep
    ref_engine = M.frozen_engine(ModelConfig(name_or_path=ref_dir), DS)
    heads = {"policy_head": engine.module.lm_head.weight, "ref_head": ref_engine.module.lm_head.weight}
    partitioned = {k: v.ds_status.name for k, v in heads.items()}
    counter = GatherCounter([*engine.module.parameters(), *ref_engine.module.parameters()], heads)
    results = {"partitioned": partitioned, "batch": batch}
    for method in ("simpo", "tdpo1"):
        obj = O.build(LossConfig(method=method))
        reference = O.LiveReference(ref_engine, obj.needs_kl)
        for it in range(3):  # later iterations run on DeepSpeed's recorded trace (prefetch, reuse)
            counter.take()
            ref = reference(batch) if obj.ref_kind == "live" else None
            gathers = {"ref_forward": counter.take()}
            pol = M.sequence_logps(engine, batch, ref.head if obj.needs_kl else None)
            loss = obj.fn(pol, ref).losses.mean()
            gathers["policy_forward"] = counter.take()
            engine.backward(loss)
            gathers["backward"] = counter.take()
            grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
            engine.step()
            results[f"{method}/{it}"] = {"loss": loss.detach(), "grads": grads, "gathers": gathers}
    if dist.rank() == 0:
        torch.save(results, out_path)
    dist.shutdown(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
