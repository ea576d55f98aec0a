"""The planner: memory (calibrated: bench/calibrate_plan.py), offline shapes, communication and time.

The ZeRO-3 model is checked against numbers DeepSpeed's own comms logger recorded (MEASURED).
"""

import json
from pathlib import Path

import pytest

from fpo_ds import config as C
from fpo_ds.tools.planner import comms, links, memory, plan, shapes, timing

ROOT = Path(__file__).resolve().parent.parent
NUMS = {"params": 2_600_000_000, "largest_layer": 590_000_000, "hidden": 2304, "layers": 26, "vocab": 256_000}


def _recipe(ds: str, method: str = "fpo", checkpointing: bool = True) -> C.Recipe:
    return C.from_dict(
        {
            "model": {"name_or_path": "x", "gradient_checkpointing": checkpointing},
            "data": {"path": "x", "max_length": 1024, "max_prompt_length": 512},
            "loss": {"method": method},
            "sae": {"path": "x"},
            "cache": {"dir": "x"},
            "train": {"micro_batch_size": 2, "global_batch_size": 32},
            "deepspeed": {"config": f"ds_configs/{ds}"},
        }
    )


def test_offload_moves_model_states_to_the_host_and_zero2_keeps_whole_parameters():
    on_gpu = memory.estimate(_recipe("zero3_bf16.json"), NUMS, 1, 8, d_sae=16384)
    offload = memory.estimate(_recipe("zero3_offload_bf16.json"), NUMS, 1, 8, d_sae=16384)
    assert offload["model_states"] < on_gpu["model_states"] and offload["zero_buffers"] < on_gpu["zero_buffers"]
    assert offload["host_model_states_per_node"] > 0 and "host_model_states_per_node" not in on_gpu
    assert on_gpu["sae_shard"] == 2304 * 2048 * 4 and on_gpu["sae_encode"] > 0
    zero2 = memory.estimate(_recipe("zero2_bf16.json"), NUMS, 1, 8)
    assert zero2["model_states"] > max(2 * NUMS["params"], on_gpu["model_states"])  # 16-bit weights whole per GPU


def test_checkpointing_and_a_live_reference_change_the_estimate_as_they_should():
    ckpt = memory.estimate(_recipe("zero3_bf16.json", "dpo"), NUMS, 1, 8)
    full = memory.estimate(_recipe("zero3_bf16.json", "dpo", checkpointing=False), NUMS, 1, 8)
    assert full["activations"] > 5 * ckpt["activations"]
    live = memory.estimate(_recipe("zero3_bf16.json", "tdpo2"), NUMS, 1, 8)
    assert "reference" in live and "reference" not in memory.estimate(_recipe("zero3_bf16.json", "simpo"), NUMS, 1, 8)
    assert any("does NOT fit" in line for line in memory.advice(full, _recipe("zero3_bf16.json"), 8 * 2**30))


# ----------------------------------------------------------------------------- offline shapes


PUBLIC_PARAMS = {  # the model cards' parameter counts
    "recipes/gemma-2-2b.yaml": 2_614_341_888,
    "recipes/gemma-2-9b.yaml": 9_241_705_984,
    "recipes/llama-3.1-8b.yaml": 8_030_261_248,
}
SAE_WIDTHS = {"recipes/gemma-2-2b.yaml": 16384, "recipes/gemma-2-9b.yaml": 16384, "recipes/llama-3.1-8b.yaml": 32768}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: planning must work offline."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("fpo-ds plan tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local model directory (config.json only) of the toy world's 4-layer Gemma-2: 166,656 parameters."""
    from fpo_ds.tools.demo import toy

    path = tmp_path_factory.mktemp("tiny-model")
    toy.tiny_config("gemma2", 283).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("path", sorted(PUBLIC_PARAMS))
def test_every_big_recipe_plans_offline_from_shipped_shapes(path, no_network):
    recipe = C.load(path)
    shape = shapes.model_shape(recipe.model.name_or_path)
    assert shape.params == PUBLIC_PARAMS[path]
    assert shapes.sae_width(recipe.sae, shape.hidden)[0] == SAE_WIDTHS[path]
    got = comms.collective_bytes(recipe, shape, links.Topology(64, 8), SAE_WIDTHS[path])
    assert got["zero_allgather_fwd"] > 0 and got["zero_reduce_scatter"] > 0 and got["sae_gather_alltoall"] > 0


def test_the_tiny_recipe_plans_from_a_local_config_and_an_unknown_hub_id_says_how(tiny_dir, no_network):
    recipe = C.load("recipes/tiny.yaml", [f"model.name_or_path={tiny_dir}"])
    assert shapes.model_shape(recipe.model.name_or_path).params == 166_656
    with pytest.raises(
        ValueError, match=r"model.name_or_path: 'acme/unknown-7b' is neither a local directory.*config.json"
    ):
        shapes.model_shape("acme/unknown-7b")


def test_sae_width_from_the_registry_a_local_cfg_or_the_flag(tmp_path):
    sae = C.SAEConfig(release="llama_scope_lxr_32x", sae_id="l31r_32x")
    assert shapes.sae_width(sae, 4096)[0] == 131072  # 32 x d_in, named "-res-131k" on Neuronpedia
    assert shapes.width_from_registry("gemma-scope-2b-pt-res", "layer_5/width_1m/average_l0_114", 2304) == 2**20
    (tmp_path / "cfg.json").write_text(json.dumps({"d_sae": 1234, "architecture": "topk", "k": 8}))
    local = C.SAEConfig(path=str(tmp_path))
    assert shapes.sae_width(local, 64) == (1234, f"{tmp_path}/cfg.json") and shapes.sae_topk(local) == 8
    assert shapes.sae_width(local, 64, override=99)[0] == 99


# ----------------------------------------------------------------------------- communication


@pytest.fixture(scope="module")
def gemma9b():
    recipe = C.load("recipes/gemma-2-9b.yaml")
    return recipe, shapes.model_shape(recipe.model.name_or_path)


def test_sae_bytes_per_call_by_hand():
    # G = 8 ranks, one pair per rank (2 rows) with 400 response tokens each: n_max = 800, d_in 3584, bf16.
    gather = 7 * 800 * 3585 * 2  # 40,152,000: the group's tokens with their row-id column
    a2a = 7 * 2 * 2048 * 4  # 114,688: my 2 rows' fp32 slices of 16384 / 8 = 2048 features, from 7 peers
    assert comms.sae_bytes_per_call(8, 800, 3584, 2, 16384, 2) == gather + a2a == 40_266_688
    assert comms.sae_bytes_per_call(8, 800, 3584, 2, 16384, 2, topk=32) == 40_266_688 + 7 * 8 * 800 * 32 * 4
    assert comms.sae_bytes_per_call(1, 800, 3584, 2, 16384, 2) == 0
    assert comms.sae_item(2, 256) == 2 and comms.sae_item(2, 300) == 4 and comms.sae_item(4, 2) == 4


def test_sae_traffic_stays_in_the_node_under_node_and_grows_with_world(gemma9b):
    recipe, shape = gemma9b
    wl = comms.Workload(micro=1, accumulation=4, seq_tokens=600, response_tokens=400)

    def sae(nodes, group):
        return comms.collective_bytes(recipe, shape, links.Topology(nodes, 8), 16384, shard_group=group, wl=wl)[
            "sae_gather_alltoall"
        ]

    per_call = comms.sae_bytes_per_call(8, 800, 3584, 2, 16384, 2)
    assert {sae(n, "node") for n in (1, 2, 8, 64)} == {2 * 4 * per_call}  # forward + backward, 4 micro-batches
    world = [sae(n, "world") for n in (1, 2, 8, 64)]
    assert world == sorted(world) and world[-1] > 50 * world[0]
    assert sae(64, "none") == 0


def test_zeropp_moves_fewer_bytes_across_nodes(gemma9b):
    recipe, shape = gemma9b
    topo = links.Topology(8, 8)
    plain = comms.zero_settings("ds_configs/zero3_bf16.json")
    zpp = comms.zero_settings("ds_configs/zero3pp_bf16.json")
    assert (zpp.hpz, zpp.qwz, zpp.qgz) == (8, True, True) and plain == zpp.zeropp(8, False)
    wl = comms.Workload(micro=1, accumulation=4, seq_tokens=600, response_tokens=400)  # the one-node split
    base, pp = (comms.collective_bytes(recipe, shape, topo, 16384, zero=z, wl=wl) for z in (plain, zpp))
    assert pp["inter_node_bytes"] < 0.2 * base["inter_node_bytes"]  # hpZ + int8 gathers + int4 gradients
    hpz = comms.collective_bytes(
        recipe, shape, topo, 16384, zero=comms.zero_settings("ds_configs/zero3_hpz_bf16.json"), wl=wl
    )
    assert pp["inter_node_bytes"] < hpz["inter_node_bytes"] < base["inter_node_bytes"]


def test_cache_rows_are_the_cache_files_columns(gemma9b):
    recipe, shape = gemma9b  # FPO: k_cache = 4 x sae.k = 200 entries per row
    got = comms.collective_bytes(recipe, shape, links.Topology(1, 8), 16384)["cache_read"]
    assert got == 4 * 1 * (2 * 200 * 8 + 32)  # 4 micro-batches of 1 pair


def test_weak_scaling_table_has_the_five_node_counts(gemma9b):
    recipe, shape = gemma9b
    wl = comms.Workload(micro=1, accumulation=4, seq_tokens=600, response_tokens=400)
    rows = timing.weak_scaling(recipe, shape, links.Topology(1, 8), 16384, wl, 0.35, 989.0)
    assert sorted({r["nodes"] for r in rows}) == [1, 2, 8, 16, 64] and len(rows) == 5 * 2 * 3
    assert {r["nodes"]: r["global_batch"] for r in rows} == {1: 32, 2: 64, 8: 256, 16: 512, 64: 2048}
    lines = plan.weak_table([rows], 8)
    assert [line.split("|")[1].strip() for line in lines[2:7]] == ["1", "2", "8", "16", "64"]
    at = {(r["nodes"], r["zeropp"], r["group"]): r for r in rows}
    assert at[(64, True, "node")]["step_s"] < at[(64, False, "node")]["step_s"]  # ZeRO++ pays off across nodes
    assert at[(1, False, "node")]["mfu"] > at[(64, False, "node")]["mfu"]


def test_the_cli_prints_bytes_time_and_the_table_offline(capsys, no_network):
    plan.main(["recipes/gemma-2-9b.yaml", "--nodes", "64", "--gpus-per-node", "8", "train.global_batch_size=2048"])
    out = capsys.readouterr().out
    assert "CHANGED" not in out  # 2048 = micro 1 x 512 ranks x accumulation 4: the recipe's own batch
    for needle in (
        "zero_allgather_fwd",
        "zero_reduce_scatter",
        "sae_token_gather",
        "cache_read",
        "MFU",
        "| 64 | 512 |",
    ):
        assert needle in out


def test_the_9b_recipe_on_64_nodes_keeps_its_batch_or_says_so(capsys, no_network):
    plan.main(["recipes/gemma-2-9b.yaml", "--nodes", "64", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert "global batch 32 pairs (the recipe's train.global_batch_size); data-parallel limit 32 ranks" in out
    assert "CHANGED the global batch: 32 pairs cannot be split over micro 1 x 512 ranks" in out
    strong = out[out.index("Strong scaling: global batch 32 fixed") :].splitlines()
    assert [line.split("|")[1].strip() for line in strong[3:6]] == ["1", "2", "4"]  # 8, 16, 32 GPUs: the limit
    assert "epoch = 61,135 pairs" in strong[0]
    assert "fewer nodes: --nodes 4 (32 ranks" in out and "train.global_batch_size=512" in out
    assert "retune train.lr" in out
    # no MFU was pinned: both ends of the range, each with its source
    assert "MFU not calibrated" in out and "low: " in out and "high: " in out
    assert "MFU 0.10: compute" in out and "MFU 0.40: compute" in out


def test_the_mfu_is_pinned_by_flag_or_by_a_bench_run(capsys, no_network):
    plan.main(["recipes/gemma-2-2b.yaml", "--mfu", "0.3"])
    out = capsys.readouterr().out
    assert "MFU 0.30 (pinned: --mfu)" in out and "MFU not calibrated" not in out
    plan.main(["recipes/gemma-2-2b.yaml", "--calibrate", "bench/results/h200-gemma-2-2b-bench.json"])
    out = capsys.readouterr().out
    assert "pinned: --calibrate h200-gemma-2-2b-bench.json: fpo median MFU 0.098 as reported (6N)" in out


def test_one_flops_convention_6n_attention_recompute_by_hand():
    from fpo_ds.tools.planner import compute

    shape = shapes.model_shape("google/gemma-2-2b")
    n, attn = shape.params, 4 * 26 * 8 * 256 * 1024  # tied embedding: every parameter is in a matmul
    assert compute.train_flops_per_token(shape, 1024, False) == 3 * (2 * n + attn)
    assert compute.train_flops_per_token(shape, 1024, True) == 4 * (2 * n + attn)
    # the shipped 2B bench run (6N, checkpointing, 1024 tokens) in this convention
    got = compute.bench_mfu("bench/results/h200-gemma-2-2b-bench.json")
    assert got.value == pytest.approx(0.0978 * 4 * (2 * n + attn) / (6 * n), rel=0.01)


def test_all_to_all_latency_grows_with_the_peer_count():
    topo = links.Topology(64, 8)
    small = links.Traffic("x", 8.0, 1, links.Link(8, 8), "all_to_all", "bwd", 0)
    big = small._replace(link=links.Link(64, 1))
    assert links.seconds(big, topo) > 10 * links.seconds(small, topo)  # 63 network hops against 7 NVLink ones


def test_every_step_pays_its_syncs_and_zero2_all_reduces(gemma9b):
    recipe, shape = gemma9b
    wl = comms.Workload(micro=1, accumulation=4, seq_tokens=600, response_tokens=400)
    step = comms.plan_step(recipe, shape, links.Topology(2, 8), 16384, wl=wl)
    names = [t.name for t in step.traffic if t.micro < 0]
    assert {"metrics_all_reduce", "stop_check", "grad_norm_all_reduce", "overflow_check"} <= set(names)
    assert names.count("stop_check") == 1  # once per optimizer step, not per micro-batch
    z2 = comms.plan_step(recipe, shape, links.Topology(2, 8), 16384, zero=comms.ZeroSettings(item=2, stage=2), wl=wl)
    red = [t for t in z2.traffic if t.name == "zero_allreduce"]
    assert len(red) == 4 and red[0].received == pytest.approx(2 * 15 / 16 * shape.params * 2)
    assert not any(t.name.startswith("zero_allgather_f") for t in z2.traffic)


def test_tune_prints_three_ranked_settings_with_overrides(capsys, no_network):
    plan.main(["recipes/gemma-2-2b.yaml", "--nodes", "2", "--gpus-per-node", "8", "--tune"])
    out = capsys.readouterr().out
    tune = out[out.index("Tune: fastest settings at global batch 32") :]
    ranked = [line for line in tune.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    times = [float(line.split("step ")[1].split(" s")[0]) for line in ranked]
    assert len(ranked) == 3 and times == sorted(times)
    assert tune.count("overrides: train.micro_batch_size=") == 3 and tune.count('"zero_optimization"') == 3


# ----------------------------------------------------------------------------- against DeepSpeed itself


# DeepSpeed 0.19.8's comms logger (all_gather_into_tensor / reduce_scatter_tensor msg_size x count per
# step, steps 2-3 after one warm-up step, fp32, micro-batch 2 x accumulation 2) on CPU ranks (gloo)
# training the toy 4-layer Gemma-2 under ZeRO-3 with these knobs: (ranks, checkpointing, knobs,
# all-gather bytes, all-gather calls, reduce-scatter bytes, reduce-scatter calls).
MEASURED = [
    (2, False, {}, 333_312, 46, 1_333_248, 2),  # defaults: every tensor <= 1e5 elements stays whole
    (2, True, {"persistence": 0}, 666_624, 2, 1_333_248, 2),
    (2, True, {"persistence": 0, "prefetch_bucket": 0, "max_reuse": 0}, 2_071_040, 268, 1_333_248, 2),
    (2, False, {"persistence": 0, "prefetch_bucket": 10_000, "max_reuse": 20_000}, 788_736, 28, 1_333_248, 2),
    (
        3,
        True,
        {"persistence": 0, "prefetch_bucket": 20_000, "max_live": 30_000, "max_reuse": 50_000, "reduce_bucket": 40_000},
        1_025_296,
        84,
        1_333_824,
        10,
    ),
    (
        4,
        True,
        {
            "persistence": 0,
            "prefetch_bucket": 20_000,
            "max_live": 30_000,
            "max_reuse": 50_000,
            "reduce_bucket": 40_000,
            "hpz": 2,
        },
        1_370_624,
        85,
        1_333_248,
        10,
    ),
]


@pytest.mark.parametrize("ranks,ckpt,knobs,ag,ag_calls,rs,rs_calls", MEASURED)
def test_the_zero3_model_reproduces_deepspeeds_comms_logger(tiny_dir, ranks, ckpt, knobs, ag, ag_calls, rs, rs_calls):
    recipe = C.load(
        "recipes/tiny.yaml",
        [f"model.name_or_path={tiny_dir}", "loss.method=simpo", f"model.gradient_checkpointing={str(ckpt).lower()}"],
    )
    shape = shapes.model_shape(tiny_dir)
    topo = links.Topology(ranks // 2 if "hpz" in knobs else 1, 2 if "hpz" in knobs else ranks)
    zero = comms.ZeroSettings(item=4, **knobs)
    step = comms.plan_step(recipe, shape, topo, zero=zero, wl=comms.Workload(2, 2, 40, 20))
    calls = {}
    for t in (t for t in step.traffic if t.name.startswith("zero_")):  # not the per-step syncs
        calls[t.name.startswith("zero_allgather")] = calls.get(t.name.startswith("zero_allgather"), 0) + t.calls
    assert (step.logged.allgather, calls[True], step.logged.reduce_scatter, calls[False]) == (
        ag,
        ag_calls,
        rs,
        rs_calls,
    )


def test_memory_items_use_the_shard_group():
    def shard(group, nodes=2):
        return memory.estimate(_recipe("zero3_bf16.json"), NUMS, nodes, 8, d_sae=16384, shard_group=group)["sae_shard"]

    assert shard("node") == 2304 * 2048 * 4 and shard("world") == 2304 * 1024 * 4 and shard("none") == 2304 * 16384 * 4
    assert "hpz_secondary" in memory.estimate(_recipe("zero3pp_bf16.json"), NUMS, 2, 8, d_sae=16384)


def test_plan_exits_nonzero_when_the_recipe_does_not_fit(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["recipes/gemma-2-2b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "4"])
    assert e.value.code == plan.EXIT_DOES_NOT_FIT and "does NOT fit" in capsys.readouterr().out


# ----------------------------------------------------------------------------- numbers that cannot go stale


def _markdown(capsys, argv: list[str]) -> tuple[str, str]:
    """(README block, recipe header line) as `fpo-ds plan ... --markdown` prints them today."""
    plan.main([*argv, "--markdown"])
    out = capsys.readouterr().out.rstrip("\n")
    block, header = out.rsplit("\n\nRecipe header: ", 1)
    return block, header


def test_the_readme_scaling_block_is_what_the_planner_prints(capsys, no_network):
    readme = (ROOT / "README.md").read_text()
    begin = "<!-- BEGIN fpo-ds plan "
    argv = readme[readme.index(begin) + len(begin) :].split(" --markdown -->")[0].split()
    block = readme.split(" --markdown -->\n", 1)[1].split("<!-- END fpo-ds plan -->")[0].strip("\n")
    want, _ = _markdown(capsys, argv)
    assert block == want, "README's scaling block is stale: paste `fpo-ds plan ... --markdown` (its first part)"


@pytest.mark.parametrize("path", ["recipes/gemma-2-2b.yaml", "recipes/gemma-2-9b.yaml", "recipes/llama-3.1-8b.yaml"])
def test_every_recipe_header_carries_todays_plan_line(capsys, no_network, path):
    import re

    text = (ROOT / path).read_text()
    found = re.search(r"^# Plan \(fpo-ds plan (\S+)(?: --nodes (\d+))?\).*$", text, re.M)
    assert found and found.group(1) == path, f"{path}: no '# Plan (fpo-ds plan {path} ...)' header line"
    _, header = _markdown(capsys, [path, "--nodes", found.group(2) or "1"])
    assert found.group(0) == header, f"{path}: stale plan line; replace it with\n{header}"
