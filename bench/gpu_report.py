"""The GPU check's reports: environment, FPO-vs-SimPO profile comparison, planner calibration, summary.

    python bench/gpu_report.py env OUT
    python bench/gpu_report.py calibrate OUT --world DIR
    python bench/gpu_report.py summary OUT [--check-layout]

Reads what bench/gpu_steps.py wrote under OUT (profile/, sweep/) and bench/gpu_check.sh's stage
records (status/); writes profile/compare.{json,md}, calibrate/calibrate.{json,md}, summary.md
and results.json. --check-layout (the CPU dry run) exits 1 naming every missing or failed part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("unit", "world", "profile", "sweep", "calibrate")
SPANS = ("fpo:tap_hook", "fpo:sae_read", "fpo:cache_read", "step:loss")  # bench/gpu_steps.instrument's names
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")  # each waits for the device
TOP = 15


# ----------------------------------------------------------------------------- the FLOPs convention


def flops_per_token(shape, seq: int, checkpointing: bool) -> float:
    """Model FLOPs per trained token: the planner's convention, the one function every MFU here goes through.

    fpo_ds.tools.planner.compute.train_flops_per_token: 6N + attention (full T x T) + the recompute
    under activation checkpointing.
    """
    from fpo_ds.tools.planner import compute

    return compute.train_flops_per_token(shape, seq, checkpointing)


def peak_tflops() -> float:
    """The GPU's dense bf16 peak (PEAK_TFLOPS; 989 for H100/H200 SXM)."""
    return float(os.environ.get("PEAK_TFLOPS", "989"))


def mfu(shape, point: dict) -> dict:
    """A sweep point's MFU by the planner's convention, and by the older bench's 6N (to compare with bench/results)."""
    seq, rate = point["widest"], point["tokens_per_s"]
    planner = rate * flops_per_token(shape, seq, point["checkpointing"]) / (peak_tflops() * 1e12)
    return {"mfu": planner, "mfu_6n": rate * 6 * shape.params / (peak_tflops() * 1e12)}


# ----------------------------------------------------------------------------- env


def env(out: Path) -> dict:
    """What ran: device, driver, library versions, the source tree's commit."""
    import torch

    info = {"time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": platform.python_version()}
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if torch.cuda.is_available():
        info["device_mem_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
    for name in ("deepspeed", "transformers", "sae_lens", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is reported, the unit stage names it too
            info[name] = f"missing ({type(e).__name__})"
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True)
    info["tree_modified"] = bool(dirty.stdout.strip())
    info["peak_tflops"] = peak_tflops()
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- profile comparison


def _ops(path: Path) -> dict:
    rec = json.loads(path.read_text())
    rec["by_name"] = {r["name"]: r for r in rec["ops"]}
    return rec


def _per_step(rec: dict, name: str, key: str) -> float:
    return rec["by_name"].get(name, {}).get(key, 0.0) / rec["steps"] / 1000.0  # ms per step


def _is_op(r: dict) -> bool:
    """An operator row (not a kernel, not one of our spans, not the profiler's own)."""
    return not r["kernel"] and not r["name"].startswith(("fpo:", "step:", "ProfilerStep", "cuda"))


def _sum(rec: dict, key: str, match) -> float:
    return sum(r[key] for r in rec["ops"] if match(r)) / rec["steps"] / 1000.0


def _parts(rec: dict, time_key: str) -> dict:
    """Where a step's time goes, in ms per step (CPU times where noted)."""
    parts = {"wall (profiled)": statistics.median(rec["wall_s"]) * 1000.0}
    parts["device busy (all kernels)"] = _sum(rec, "device_us", lambda r: r["kernel"])
    parts["device idle (wall - busy)"] = parts["wall (profiled)"] - parts["device busy (all kernels)"]
    for span in SPANS:
        parts[f"{span} (host)"] = _per_step(rec, span, "cpu_us")
        parts[f"{span} (device)"] = _per_step(rec, span, "device_us")
    encode_bwd = lambda r: any(k in r["name"] for k in ("_EncodePoolBackward", "_CollectiveBackward"))  # noqa: E731
    parts["SAE encode backward (host)"] = _sum(rec, "cpu_us", lambda r: encode_bwd(r) and not r["kernel"])
    parts["SAE encode backward (device)"] = _sum(rec, "self_device_us", encode_bwd)
    parts["host syncs (host wait)"] = _sum(rec, "cpu_us", lambda r: r["name"] in SYNCS)
    parts["host syncs (calls)"] = _sum(rec, "count", lambda r: r["name"] in SYNCS + HOST_READS) * 1000.0
    parts["cache H2D copies (device)"] = _sum(rec, "device_us", lambda r: r["name"].startswith("Memcpy HtoD"))
    parts["top op time total"] = _sum(rec, time_key, _is_op)
    return parts


def compare(out: Path) -> dict:
    """profile/{simpo,fpo}/ops.json -> the top ops of each, their difference, and where FPO's extra goes."""
    prof = out / "profile"
    recs = {m: _ops(prof / m / "ops.json") for m in ("simpo", "fpo")}
    cuda = recs["fpo"]["device"] == "cuda"
    key = "self_device_us" if cuda else "self_cpu_us"  # the CPU dry run has no device times
    top = {}
    for m, rec in recs.items():
        rows = sorted((r for r in rec["ops"] if _is_op(r)), key=lambda r: r[key], reverse=True)[:TOP]
        top[m] = [
            {
                "name": r["name"],
                "ms_per_step": r[key] / rec["steps"] / 1000.0,
                "calls_per_step": r["count"] / rec["steps"],
            }
            for r in rows
        ]
    names = {r["name"] for rec in recs.values() for r in rec["ops"] if _is_op(r)}
    diff = [
        {
            "name": n,
            "fpo_ms": _per_step(recs["fpo"], n, key),
            "simpo_ms": _per_step(recs["simpo"], n, key),
            "calls_diff": (recs["fpo"]["by_name"].get(n, {}).get("count", 0) / recs["fpo"]["steps"])
            - (recs["simpo"]["by_name"].get(n, {}).get("count", 0) / recs["simpo"]["steps"]),
        }
        for n in names
    ]
    for d in diff:
        d["diff_ms"] = d["fpo_ms"] - d["simpo_ms"]
    diff = sorted(diff, key=lambda d: abs(d["diff_ms"]), reverse=True)[:TOP]
    parts = {m: _parts(rec, key) for m, rec in recs.items()}
    points = _read_points(prof / "points.jsonl")
    result = {"time_key": key, "top": top, "diff": diff, "parts": parts, "points": points}
    result["verdict"] = _verdict(parts, points)
    (prof / "compare.json").write_text(json.dumps(result, indent=1))
    (prof / "compare.md").write_text(compare_markdown(result))
    return result


def _verdict(parts: dict, points: dict) -> list[str]:
    """Plain sentences: FPO's extra time per step, and the named parts that explain it, largest first."""
    lines = []
    ok = {p["method"]: p for p in points.values() if p.get("status") == "ok"}
    if len(ok) == 2:
        f, s = ok["fpo"]["step_s"], ok["simpo"]["step_s"]
        lines.append(f"Unprofiled: FPO {1000 * f:.1f} ms/step vs SimPO {1000 * s:.1f} ms/step, ratio {f / s:.3f}.")
    extra = {k: parts["fpo"][k] - parts["simpo"][k] for k in parts["fpo"]}
    lines.append(
        f"Profiled: FPO - SimPO = {extra['wall (profiled)']:+.1f} ms/step wall, of which device busy "
        f"{extra['device busy (all kernels)']:+.1f} ms and device idle {extra['device idle (wall - busy)']:+.1f} ms."
    )
    named = {
        "tap hook": extra["fpo:tap_hook (host)"],
        "SAE read, forward (gather + encode + pool; device)": extra["fpo:sae_read (device)"],
        "SAE read, forward (host)": extra["fpo:sae_read (host)"],
        "SAE encode backward (device)": extra["SAE encode backward (device)"],
        "cache read (host)": extra["fpo:cache_read (host)"],
        "cache read host-to-device copies (device)": extra["cache H2D copies (device)"],
        "host waits for the device (syncs)": extra["host syncs (host wait)"],
        "loss (host)": extra["step:loss (host)"],
    }
    for name, ms in sorted(named.items(), key=lambda kv: -abs(kv[1])):
        lines.append(f"- {name}: {ms:+.2f} ms/step")
    lines.append(f"- host-device sync points: {extra['host syncs (calls)']:+.0f} per step")
    return lines


def compare_markdown(r: dict) -> str:
    unit = "device" if r["time_key"] == "self_device_us" else "CPU (dry run: no device times)"
    lines = ["# FPO vs SimPO under torch.profiler", "", *r["verdict"], ""]
    for m in ("simpo", "fpo"):
        lines += [f"## Top {TOP} ops of {m} by self {unit} time", "", "| op | ms/step | calls/step |", "|---|---|---|"]
        lines += [f"| `{o['name']}` | {o['ms_per_step']:.3f} | {o['calls_per_step']:.1f} |" for o in r["top"][m]]
        lines.append("")
    lines += [
        f"## FPO - SimPO, the {TOP} largest differences (self {unit} time)",
        "",
        "| op | FPO ms/step | SimPO ms/step | difference | calls/step difference |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{d['name']}` | {d['fpo_ms']:.3f} | {d['simpo_ms']:.3f} | {d['diff_ms']:+.3f} | {d['calls_diff']:+.1f} |"
        for d in r["diff"]
    ]
    lines += [
        "",
        "## Where each step's time goes (ms/step)",
        "",
        "| part | SimPO | FPO | FPO - SimPO |",
        "|---|---|---|---|",
    ]
    for k in r["parts"]["fpo"]:
        s, f = r["parts"]["simpo"][k], r["parts"]["fpo"][k]
        lines.append(f"| {k} | {s:.2f} | {f:.2f} | {f - s:+.2f} |")
    lines += ["", "Traces: profile/simpo/trace.json.gz, profile/fpo/trace.json.gz (chrome://tracing or Perfetto)."]
    return "\n".join(lines) + "\n"


def measured_points(out: Path) -> list[dict]:
    """Every measured setting: the profile stage's two (timed before the profiler starts), then the sweep's."""
    return [
        *_read_points(out / "profile" / "points.jsonl").values(),
        *_read_points(out / "sweep" / "points.jsonl").values(),
    ]


def _read_points(path: Path) -> dict:
    if not path.is_file():
        return {}
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r.get("point", r.get("method")): r for r in recs}


# ----------------------------------------------------------------------------- calibration


def calibrate(out: Path, world: Path) -> list[dict]:
    """The planner's memory and step time against each measured sweep point.

    Memory: memory.estimate at the point's micro-batch, widest padded length and checkpointing.
    Time: the planner's compute MFU is fitted on a ZeRO-3 FPO point (its predicted step
    equals the measured one there) and that MFU predicts every other point. The planner models
    ZeRO-3 only: stage-0 (auto) points are predicted as ZeRO-3 and marked so.
    """
    from fpo_ds.tools.planner import shapes

    shape = shapes.model_shape(str(world / "model"))
    d_sae = json.loads((world / "sae" / "cfg.json").read_text())["d_sae"]
    points = [p for p in measured_points(out) if p.get("status") == "ok"]
    rows = [{"point": p["point"], **_plan(p, shape, d_sae, world, mfu=1.0)} for p in points]
    order = sorted(zip(rows, points), key=lambda rp: (rp[1]["zero_stage"] != 3, rp[1]["method"] != "fpo"))
    fit_on = order[0][0] if order else None  # a ZeRO-3 FPO point where there is one
    fitted = None
    if fit_on is not None:
        p = next(p for p in points if p["point"] == fit_on["point"])
        rest = fit_on["pred_step_s"] - fit_on["compute_s"]
        fitted = fit_on["compute_s"] / max(p["step_s"] - rest, 1e-9)
    for r, p in zip(rows, points):
        if fitted:
            r.update(_plan(p, shape, d_sae, world, mfu=fitted))
        r.update(
            measured_step_s=p["step_s"],
            measured_peak_mib=p["peak_mem_mib"],
            zero_stage=p["zero_stage"],
            fitted_mfu=fitted,
            fitted_on=fit_on["point"] if fit_on else None,
            **mfu(shape, p),
        )
        r["step_error"] = r["pred_step_s"] / r["measured_step_s"] - 1
        r["mem_error"] = r["pred_peak_mib"] / r["measured_peak_mib"] - 1
        r["note"] = "" if p["zero_stage"] == 3 else f"measured at ZeRO-{p['zero_stage']}; the planner models ZeRO-3"
    (out / "calibrate").mkdir(exist_ok=True)
    (out / "calibrate" / "calibrate.json").write_text(json.dumps(rows, indent=1))
    (out / "calibrate" / "calibrate.md").write_text(calibrate_markdown(rows))
    fpo = next((p for p in points if p["point"] == "profile-fpo"), None)
    if fpo is not None:
        plan_calibrated(out / "calibrate", fpo, shape.params)
    return rows


PLAN = ["recipes/gemma-2-2b.yaml", "--nodes", "1", "--gpus-per-node", "1"]


def plan_calibrated(out: Path, fpo: dict, params: int) -> int:
    """`fpo-ds plan` of the shipped 2B recipe on this GPU, pinned to the measured FPO MFU (its --calibrate).

    bench.json carries the recipe's setting's point (ZeRO-3, checkpointing, micro 2) in the bench's
    format and the planner's convention; plan.txt is the planner's output with it.
    """
    from fpo_ds.tools.planner import compute

    bench = {
        "flops_convention": compute.CONVENTION,
        "config": {"seq": fpo["widest"], "checkpointing": fpo["checkpointing"], "micro": fpo["micro"], "nproc": 1},
        "params": params,
        "methods": {"fpo": {"mfu": [fpo["mfu"]], "step_time_s": [fpo["step_s"]]}},
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=1))
    cmd = [sys.executable, "-m", "fpo_ds.cli", "plan", *PLAN, "--calibrate", str((out / "bench.json").resolve())]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = "$ fpo-ds plan " + " ".join(PLAN) + " --calibrate calibrate/bench.json"
    (out / "plan.txt").write_text(f"{line}\n(exit {proc.returncode})\n{proc.stdout}{proc.stderr}")
    return proc.returncode


def _plan(point: dict, shape, d_sae: int, world: Path, mfu: float) -> dict:
    """The planner's per-GPU memory and step time for one point, on one GPU, at this compute MFU."""
    from fpo_ds import config as C
    from fpo_ds.tools.planner import comms, memory, timing

    ds = "zero3_bf16.json" if point["dtype"] == "bf16" else "zero3_fp32.json"
    raw = {
        "model": {"name_or_path": str(world / "model"), "gradient_checkpointing": point["checkpointing"]},
        "data": {"path": "x", "max_length": point["widest"], "max_prompt_length": point["widest"] // 2},
        "loss": {"method": point["method"]},
        "sae": {"path": str(world / "sae")},
        "cache": {"dir": "x"},
        "train": {"micro_batch_size": point["micro"], "global_batch_size": point["micro"]},
        "deepspeed": {"config": str(ROOT / "ds_configs" / ds)},
    }
    recipe = C.from_dict(raw)
    nums = {k: getattr(shape, k) for k in ("params", "hidden", "layers", "vocab", "largest_layer")}
    d = d_sae if point["method"] == "fpo" else None
    items = memory.estimate(recipe, nums, 1, 1, d)
    topo = comms.Topology(1, 1)
    half = point["widest"] // 2
    step = comms.plan_step(recipe, shape, topo, d, "node", comms.zero_settings(recipe.deepspeed.config), (half, half))
    t = timing.step_time(recipe, shape, topo, step, d, mfu, peak_tflops())
    mem = sum(v for k, v in items.items() if not k.startswith("host")) / 2**20
    return {"pred_step_s": t["step_s"], "compute_s": t["compute_s"], "pred_peak_mib": mem}


def calibrate_markdown(rows: list[dict]) -> str:
    if not rows:
        return "# Planner calibration\n\nNo sweep point finished: nothing to calibrate.\n"
    lines = [
        "# Planner calibration",
        "",
        f"Compute MFU fitted on {rows[0]['fitted_on']}: {rows[0]['fitted_mfu'] or 0:.3g} (planner convention). "
        f"MFU columns: planner convention / 6N, at {peak_tflops():.0f} TFLOPS peak.",
        "",
        "| point | ZeRO | step measured (s) | planner (s) | error | peak measured (MiB) | planner (MiB) | error "
        "| MFU | MFU 6N | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['zero_stage']} | {r['measured_step_s']:.3f} | {r['pred_step_s']:.3f} "
            f"| {100 * r['step_error']:+.1f}% | {r['measured_peak_mib']:.0f} | {r['pred_peak_mib']:.0f} "
            f"| {100 * r['mem_error']:+.1f}% | {r['mfu']:.3g} | {r['mfu_6n']:.3g} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- summary


def _unit(out: Path) -> dict:
    path = out / "unit" / "junit.xml"
    if not path.is_file():
        return {"ran": False}
    cases = ET.parse(path).getroot().iter("testcase")
    res = {"ran": True, "passed": [], "failed": [], "skipped": []}
    for c in cases:
        name = c.get("name")
        kind = "failed" if c.find("failure") is not None or c.find("error") is not None else None
        kind = kind or ("skipped" if c.find("skipped") is not None else "passed")
        res[kind].append(name)
    return res


def _stages(out: Path) -> dict:
    return {
        s: json.loads((out / "status" / f"{s}.json").read_text())
        for s in STAGES
        if (out / "status" / f"{s}.json").is_file()
    }


def summary(out: Path) -> dict:
    """results.json (everything, machine-readable) and summary.md (what a reader needs first)."""
    res = {"env": _json(out / "env.json"), "stages": _stages(out), "unit": _unit(out)}
    if all((out / "profile" / m / "ops.json").is_file() for m in ("simpo", "fpo")):
        compare(out)
    res["profile"] = _json(out / "profile" / "compare.json")
    res["sweep"] = measured_points(out)
    res["calibrate"] = _json(out / "calibrate" / "calibrate.json")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "summary.md").write_text(summary_markdown(res))
    return res


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def summary_markdown(res: dict) -> str:
    e = res["env"] or {}
    modified = ", modified" if e.get("tree_modified") else ""
    lines = [
        f"# GPU check: {e.get('device', '?')} (commit {e.get('commit', '?')}{modified})",
        "",
        f"torch {e.get('torch')} (CUDA {e.get('cuda')}), deepspeed {e.get('deepspeed')}, transformers "
        f"{e.get('transformers')}, sae-lens {e.get('sae_lens')}; {e.get('time_utc')} UTC.",
        "",
        "| stage | exit | seconds | limit | timed out |",
        "|---|---|---|---|---|",
    ]
    for name, s in res["stages"].items():
        lines.append(
            f"| {name} | {s['rc']} | {s['seconds']:.0f} | {s['limit_s']} | {'YES' if s['timed_out'] else 'no'} |"
        )
    u = res["unit"]
    lines += ["", "## GPU unit checks (pytest -m gpu)", ""]
    if u.get("ran"):
        lines.append(f"{len(u['passed'])} passed, {len(u['failed'])} failed, {len(u['skipped'])} skipped.")
        lines += [f"- FAILED: {n}" for n in u["failed"]] + [f"- skipped: {n}" for n in u["skipped"]]
    else:
        lines.append("Did not run (no unit/junit.xml).")
    lines += ["", "## FPO vs SimPO (profile/compare.md has the op tables)", ""]
    lines += res["profile"]["verdict"] if res["profile"] else ["No comparison (profile stage incomplete)."]
    lines += [
        "",
        "## MFU: the profile stage's two points and the sweep (calibrate/: the planner against them)",
        "",
        "| point | status | ZeRO | step (s) | tokens/s | peak (MiB) | MFU | MFU 6N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["sweep"]:
        if p.get("status") != "ok":
            lines.append(f"| {p['point']} | {p.get('status')}: {p.get('error', '')[:120]} | | | | | | |")
            continue
        mfus = f"{p['mfu']:.3g} | {p['mfu_6n']:.3g}"
        lines.append(
            f"| {p['point']} | ok | {p['zero_stage']} | {p['step_s']:.3f} | {p['tokens_per_s']:.0f} "
            f"| {p['peak_mem_mib']:.0f} | {mfus} |"
        )
    return "\n".join(lines) + "\n"


def check_layout(out: Path, res: dict) -> list[str]:
    """Problems with a finished check's results directory (empty: complete and every stage passed)."""
    need = [
        "env.json",
        "summary.md",
        "results.json",
        "unit/junit.xml",
        "profile/compare.md",
        "profile/compare.json",
        "sweep/points.jsonl",
        "calibrate/calibrate.json",
        "calibrate/calibrate.md",
        "calibrate/plan.txt",
    ]
    need += [f"profile/{m}/{f}" for m in ("simpo", "fpo") for f in ("ops.json", "trace.json.gz")]
    need += [f"logs/{s}.log" for s in STAGES] + [f"status/{s}.json" for s in STAGES]
    problems = [f"missing {n}" for n in need if not (out / n).is_file()]
    problems += [
        f"stage {s}: exit {v['rc']}" + (" (timed out)" if v["timed_out"] else "")
        for s, v in res["stages"].items()
        if v["rc"] != 0
    ]
    u = res["unit"]
    if u.get("ran") and (u["failed"] or u["skipped"] or not u["passed"]):
        problems.append(f"unit: {len(u['failed'])} failed, {len(u['skipped'])} skipped, {len(u['passed'])} passed")
    bad = [p["point"] for p in res["sweep"] if p.get("status") != "ok"]
    problems += [f"point {n} did not finish" for n in bad]
    if res["calibrate"] is not None and len(res["calibrate"]) != sum(p.get("status") == "ok" for p in res["sweep"]):
        problems.append("calibrate: not one row per finished sweep point")
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["env", "calibrate", "summary"])
    p.add_argument("out")
    p.add_argument("--world", help="calibrate: the world bench/gpu_steps.py built (model and SAE)")
    p.add_argument("--check-layout", action="store_true", help="summary: exit 1 unless every part is there and passed")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.what == "env":
        print(json.dumps(env(out)))
    elif args.what == "calibrate":
        print(calibrate_markdown(calibrate(out, Path(args.world))))
    else:
        res = summary(out)
        print((out / "summary.md").read_text())
        problems = check_layout(out, res) if args.check_layout else []
        for problem in problems:
            print(f"gpu_check: {problem}", file=sys.stderr)
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
