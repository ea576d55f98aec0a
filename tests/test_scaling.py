"""Scaling past one node: 4 ranks as 2 hosts x 2 ranks (network namespaces), FPO with every shard group.

One launch (two torchrun agents, one per host) builds the offline cache and trains FPO with
sae.shard_group node, world and none, DeepSpeed's comms logger on, then checks the sharded
encoder against sae-lens for group sizes 1, 2 and 4. The assertions:
  - the three groups give the same losses (the encoder is exact for any group);
  - the SAE bytes per rank: none 0 < node < world, and node does not depend on the world;
  - the encoder's own byte counter equals what DeepSpeed's comms logger saw on the wire;
  - the planner's byte model (fpo-ds plan) matches the measured ZeRO-3 and SAE traffic within 10%.
"""

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import launch_on_hosts, need_infra

from fpo_ds import data
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("node", "world", "none")
HOSTS, PER_HOST = 2, 2


def _recipe(tmp: Path, world: Path, name: str, ds_json: Path, **sections) -> str:
    raw = {
        "model": {"name_or_path": str(world / "model")},
        "data": {"path": str(world / "data" / "train.jsonl"), "max_length": 48, "max_prompt_length": 24},
        "loss": {"method": "fpo"},
        "sae": {"path": str(tmp / "sae"), "k": 8},
        "cache": {"dir": str(tmp / "cache")},
        "train": {"global_batch_size": 8, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3},
        "deepspeed": {"config": str(ds_json), "timeout_minutes": 3},
        "logging": {"progress_bar": False},
        "output": {"dir": str(tmp / "runs" / name)},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    need_infra("netns_up.sh")
    tmp = tmp_path_factory.mktemp("scaling")
    world = toy.write_world(tmp / "world", "gemma2", n_train=32, n_eval=8)
    toy.random_sae("jumprelu", 64, 96, 3, seed=1).save_model(str(tmp / "sae"))
    ds = json.loads((ROOT / "ds_configs" / "zero3_fp32.json").read_text())
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    ds_json = tmp / "zero3_fp32_comms.json"
    ds_json.write_text(json.dumps(ds))
    spec = [{"name": "cache", "stage": "build-cache", "recipe": _recipe(tmp, world, "cache", ds_json)}]
    for g in GROUPS:
        recipe = _recipe(tmp, world, f"fpo-{g}", ds_json, sae={"shard_group": g})
        spec.append({"name": g, "stage": "train", "recipe": recipe, "comms": True})
    spec.append({"name": "sae", "check": "sae", "groups": ["none", "node", "world"]})
    out = tmp / "out"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    entry = [str(ROOT / "tests" / "mp_driver.py"), str(out / "spec.json"), str(out)]
    procs, logs = launch_on_hosts(entry, HOSTS, PER_HOST, 29641, "10.77.0.1", timeout=1200)
    (out / "log.txt").write_text("\n".join(logs))
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-4000:] for x in logs)
    assert "2 node(s) x 2 rank(s)" in logs[0]
    return {"res": json.loads((out / "results.json").read_text()), "tmp": tmp, "world": world, "logs": logs}


def _hist(run, group: str) -> list[dict]:
    return run["res"][group]["history"]


def test_every_shard_group_trains_the_same(run):
    node = [h["loss"] for h in _hist(run, "node")]
    assert len(node) == 3 and all(math.isfinite(x) for x in node)
    for g in ("world", "none"):
        assert [h["loss"] for h in _hist(run, g)] == pytest.approx(node, abs=1e-5), g
    assert "shard group of 2 rank(s) (sae.shard_group=node)" in run["logs"][0]


def test_sae_bytes_per_rank_node_below_world_and_none_zero(run):
    total = {g: sum(h["fpo/sae_comm_bytes_per_step"] for h in _hist(run, g)) for g in GROUPS}
    assert total["none"] == 0 and 0 < total["node"] < total["world"], total


def _received(comms: dict, group: int) -> float:
    """Bytes a rank received in the encoder's collectives, from the comms logger's message sizes.

    all_gather logs its input (one rank's piece): a rank receives (G-1) of them. all_to_all logs
    its whole input list (G pieces): a rank receives (G-1)/G of it.
    """
    gather = comms.get("sae_gather", {}).get("bytes", 0) + comms.get("sae_topk_gather", {}).get("bytes", 0)
    a2a = sum(comms.get(k, {}).get("bytes", 0) for k in ("sae_all_to_all", "sae_all_to_all_grad", "sae_gather_grad"))
    return (group - 1) * gather + (group - 1) / group * a2a


def test_encoder_counter_equals_the_wire(run):
    for g, size in (("node", PER_HOST), ("world", HOSTS * PER_HOST)):
        comms = run["res"][g]["comms"]
        counted = sum(h["fpo/sae_comm_bytes_per_step"] for h in _hist(run, g))  # rank 0's counter
        assert _received(comms[0], size) == pytest.approx(counted, rel=1e-9), (g, comms[0])
    assert not any(k.startswith("sae_") for k in run["res"]["none"]["comms"][0])


def test_sharded_encoder_matches_sae_lens_for_every_group_size(run):
    sizes = set()
    for rank_res in run["res"]["sae"]["per_rank"]:
        assert len(rank_res) == 15, rank_res.keys()  # 5 architectures x 3 groups
        for name, r in rank_res.items():
            sizes.add(r["group_size"])
            assert r["fwd_err"] <= 1e-5 and r["grad_err"] <= 1e-5 and r["nonzero"] == 1.0, (name, r)
            assert r["n_max_given_equal"], (name, r)
    assert sizes == {1, 2, 4}


def _n_max_per_step(recipe, group: int) -> list[list[int]]:
    """Per step and micro-batch: the response tokens of the busiest rank in rank 0's shard group."""
    from fpo_ds import components

    _, pairs, _ = components.load_data(recipe)
    lengths = [data.padded_length(p) for p in pairs]
    t, world = recipe.train, HOSTS * PER_HOST
    plans = [
        data.micro_batches(len(pairs), 0, s, t.global_batch_size, t.micro_batch_size, world, lengths) for s in range(3)
    ]
    return [[max(data.response_tokens([pairs[j] for j in mb[r]]) for r in range(group)) for mb in p] for p in plans]


def test_planner_bytes_match_the_measured_ones(run):
    """fpo-ds plan's byte model vs this run: ZeRO-3 (comms logger, steady state) and the SAE group (wire)."""
    from fpo_ds import config as C
    from fpo_ds.tools.planner import comms, shapes

    recipe = C.load(run["tmp"] / "fpo-node.yaml")
    shape = shapes.model_shape(recipe.model.name_or_path)
    t, topo = recipe.train, comms.Topology(nodes=HOSTS, gpus=PER_HOST)
    wl = comms.Workload(t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * topo.world), 48, 24)
    model = comms.collective_bytes(recipe, shape, topo, d_sae=96, wl=wl)
    for g in GROUPS:  # ZeRO-3's traffic does not depend on the SAE group
        snaps = run["res"][g]["comms_steps"][0]  # rank 0: the logger's totals after steps 1, 2, 3
        per_step = {op: (snaps[-1].get(op, 0) - snaps[0].get(op, 0)) / (len(snaps) - 1) for op in snaps[-1]}
        assert per_step["all_gather_into_tensor"] == pytest.approx(model["logged_allgather_bytes"], rel=0.1), g
        assert per_step["reduce_scatter_tensor"] == pytest.approx(model["logged_reduce_scatter_bytes"], rel=0.1), g
    rows = 2 * t.micro_batch_size
    for g, size in (("node", PER_HOST), ("world", HOSTS * PER_HOST)):
        n_max = _n_max_per_step(recipe, size)
        # forward + backward per micro-batch, at the run's own token counts (fp32 model: 4-byte tokens)
        modelled = [sum(2 * comms.sae_bytes_per_call(size, n, shape.hidden, rows, 96, 4) for n in s) for s in n_max]
        measured = [h["fpo/sae_comm_bytes_per_step"] for h in _hist(run, g)]  # equal to the wire (test above)
        assert measured == pytest.approx(modelled, rel=0.1), (g, measured, modelled)
