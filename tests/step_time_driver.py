"""One launch for the emulated-cluster step-time test: shape the link, calibrate, train each configuration.

    launched by pipeline.torchrun on every test host: tests/step_time_driver.py SPEC.json OUT_DIR

SPEC.json is a list of items, run in order by every rank:
  {"name", "check": "shape", "mbit": R}   local rank 0 of each host puts a tbf qdisc of R Mbit/s on
                                          the host's eth0 (egress; 0 removes it); then a barrier
  {"name", "check": "links", "sizes"}     times gloo collectives (all_gather_into_tensor,
                                          reduce_scatter_tensor, all_to_all_single, all_reduce) over
                                          the world and over each host's ranks, per message size
  {"name", "check": "tcstats"}           every host's `tc -s qdisc` (bytes sent, drops) at this point
  {"name", "check": "compute", "recipe"}  the same model's forward + backward per micro-batch with no
                                          communication at all (plain torch on every rank at once,
                                          so the ranks share the cores as in training)
  {"name", "stage": "train", "recipe"}    a training run (fpo_ds.pipeline.run_stage) with the comms
                                          logger's totals snapshotted after every optimizer step;
                                          "alternate": R shapes every odd step's link to R Mbit/s
Rank 0 writes OUT_DIR/results.json. Assertions live in tests/test_step_time.py.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from fpo_ds import components

components.import_sae_lens()  # as fpo_ds.pipeline does before the first stage's zero.Init

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from mp_driver import comms_summary, record_steps  # noqa: E402

from fpo_ds import config as C  # noqa: E402
from fpo_ds import data, dist, pipeline  # noqa: E402

REPS = 5


def shape(mbit: float) -> dict:
    """A tbf qdisc on this host's eth0 (egress: what leaves the host); 0 removes it. Collective (a barrier)."""
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0":
        if mbit:
            # burst >= rate / HZ (250): 64 kB covers up to ~128 Mbit/s; the limit queues 50 ms of traffic
            # a queue of up to 1 s: tbf then delays rather than drops, as a switch's buffers would
            cmd = ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb"]
            subprocess.run([*cmd, "latency", "1000ms"], check=True)
        else:
            subprocess.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False, capture_output=True)
    tdist.barrier()
    return {"mbit": mbit}


def tc_stats() -> list:
    """Every host's `tc -s qdisc` of eth0 (sent, dropped, overlimits), gathered on every rank."""
    import os

    mine = None
    if os.environ.get("LOCAL_RANK", "0") == "0":
        mine = subprocess.run(["tc", "-s", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    out = [None] * dist.world_size()
    tdist.all_gather_object(out, mine)
    return [x for x in out if x is not None]


def _timed(fn, reps: int) -> float:
    """Median seconds of `fn` over `reps` calls after one warm-up, every rank lined up before each."""
    fn()
    out = []
    for _ in range(reps):
        tdist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    out.sort()
    return out[len(out) // 2]


def links(sizes: list[int]) -> dict:
    """Median seconds per call of each collective on each group, per message size (float32 elements).

    `size` is the size of the result of all_gather / the input of reduce_scatter / all_to_all / all_reduce.
    """
    res = {}
    for spec in ("node", "world"):
        g = dist.block_groups(spec)
        n = len(g.ranks)
        for size in sizes:
            size -= size % n
            for op, fn in _ops(torch.ones(size), torch.ones(size // n), g.handle).items():
                res[f"{spec}/{op}/{size}"] = {"group": n, "op": op, "elements": size, "s": _timed(fn, REPS)}
    return res


def _ops(full: torch.Tensor, part: torch.Tensor, group) -> dict:
    return {
        "all_gather": lambda: tdist.all_gather_into_tensor(full, part, group=group),
        "reduce_scatter": lambda: tdist.reduce_scatter_tensor(part, full, group=group),
        "all_to_all": lambda: tdist.all_to_all_single(full.clone(), full, group=group),
        "all_reduce": lambda: tdist.all_reduce(full, group=group),
    }


def compute(recipe_path: str) -> dict:
    """Seconds per micro-batch of the model's forward + backward with no collective, on every rank at once."""
    from transformers import AutoModelForCausalLM

    recipe = C.load(recipe_path)
    tok, pairs, _ = components.load_data(recipe)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, torch_dtype=torch.float32)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    micro, rank = recipe.train.micro_batch_size, dist.rank()
    batches = [data.collate(pairs[i : i + micro], tok.pad_token_id) for i in range(rank * micro, len(pairs), 4 * micro)]
    it = iter(batches * 10)

    def step():
        b = next(it)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        logits.float().log_softmax(-1).max(-1).values.sum().backward()

    return {"micro": micro, "ckpt": recipe.model.gradient_checkpointing, "s": _timed(step, 3 * REPS)}


def main(spec_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    results = {}
    dist.init(3)
    for item in json.loads(Path(spec_path).read_text()):
        name, check = item["name"], item.get("check")
        if check == "shape":
            results[name] = shape(item["mbit"])
        elif check == "links":
            results[name] = links(item["sizes"])
        elif check == "tcstats":
            results[name] = tc_stats()
        elif check == "compute":
            results[name] = compute(item["recipe"])
        elif item["stage"] == "build-cache":
            pipeline.run_stage(item)
            comms_summary()  # drop its records
            results[name] = {"ok": True}
        else:
            from deepspeed.utils import groups

            # DeepSpeed builds hpZ's intra-node group once per process and refuses a second run's;
            # every rank drops it before each run, so the next run builds its own (collectively).
            groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
            snapshots: list = []
            undo = record_steps(snapshots)
            rates: list = []
            restore = alternate(item["alternate"], rates) if item.get("alternate") else (lambda: None)
            result = pipeline.run_stage(item)
            history, c = result.history, result.components
            restore()
            undo()
            gathered = [None] * dist.world_size()
            tdist.all_gather_object(gathered, (comms_summary(), snapshots))
            results[name] = {"history": history, "comms": [g[0] for g in gathered], "steps": [g[1] for g in gathered]}
            results[name]["mbit"] = rates
            del c
        dist.log(f"{name} done: {json.dumps(_brief(results[name]))[:300]}")
        if dist.rank() == 0:  # after every item: a failed launch keeps what it measured
            (out / "results.json").write_text(json.dumps(results))


def alternate(mbit: float, rates: list):
    """Shape the link per optimizer step: step 0 and every even step unshaped, every odd one at `mbit`.

    Wraps train.train_step (its own clock excludes this switch, a barrier and a `tc` call); `rates`
    gets each step's rate. The unshaped steps are the run's compute calibration, taken in the same
    minute, engine and placement as the shaped ones. Returns an undo.
    """
    from fpo_ds import train

    original = train.train_step

    def step(*args, **kwargs):
        k = len(rates)
        rates.append(mbit if k % 2 else 0)
        shape(rates[-1])
        return original(*args, **kwargs)

    train.train_step = step

    def undo():
        train.train_step = original
        shape(0)

    return undo


def _brief(res: dict) -> dict:
    if "history" in res:
        return {"seconds": [round(h["step_time_s"], 3) for h in res["history"]]}
    return res


if __name__ == "__main__":
    main(*sys.argv[1:])
