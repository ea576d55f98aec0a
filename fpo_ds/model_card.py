"""The model card an export writes (README.md of the Hugging Face directory).

It says what produced the weights: the method and its coefficients, the reference and the SAE
the run was trained against, the held-out metrics of the exported step (or the latest before
it), the library versions and the full recipe. Everything comes from the checkpoint and its run
directory; nothing is looked up elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fpo_ds import metrics
from fpo_ds.config import DEFAULT_BETA, METHOD_NEEDS


def render(
    recipe: dict, step: int, run_info: dict, eval_metrics: dict, export_versions: dict, form: str = "full"
) -> str:
    """Markdown of the card. `recipe`: the checkpoint's recipe as a dict; `run_info`: the run's run_info.json.

    `form`: full (a full-parameter model), adapter (a PEFT LoRA adapter) or merged (LoRA merged into the base).
    """
    loss, model, sae = recipe.get("loss", {}), recipe.get("model", {}), recipe.get("sae", {})
    method = loss.get("method", "?")
    coef = {"beta": loss.get("beta") or DEFAULT_BETA.get(method)}
    coef |= {"alpha": loss.get("alpha")} if method in ("tdpo2", "fpo") else {}
    coef |= {"gamma_beta_ratio": loss.get("gamma_beta_ratio")} if method == "simpo" else {}
    coef |= {"reference": loss.get("reference")} if method in ("dpo", "ipo") else {}
    lines = [
        "---",
        "library_name: " + ("peft" if form == "adapter" else "transformers"),
        "tags: [fpo-ds, preference-optimization, " + method + "]",
        "---",
        f"# {method.upper()} policy, step {step}",
        "",
        f"Trained with fpo-ds, method `{method}` ({', '.join(f'{k}={v}' for k, v in coef.items())}).",
        "",
        *_form_lines(form, model),
        "## Trained against",
        f"- starting policy and reference: `{model.get('name_or_path')}`"
        + (f" (revision {model['revision']})" if model.get("revision") else ""),
        f"- data: `{recipe.get('data', {}).get('path')}` split `{recipe.get('data', {}).get('split')}`",
    ]
    if METHOD_NEEDS.get(method, (None, False, False))[2]:  # the method constrains SAE features
        where = sae.get("path") or f"{sae.get('release')} / {sae.get('sae_id')}"
        lines.append(f"- SAE: `{where}`, top-k {sae.get('k')}; reference features from the offline cache")
    if run_info.get("cache_fingerprints"):
        lines.append(f"- offline reference cache fingerprints: `{json.dumps(run_info['cache_fingerprints'])}`")
    lines += ["", "## Held-out metrics"]
    if eval_metrics:
        lines.append(f"At step {eval_metrics.get('step')}:")
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in eval_metrics.items() if k != "step" and isinstance(v, float | int)]
    else:
        lines.append("None recorded (set data.eval_split or data.eval_fraction in the recipe).")
    versions = {k: run_info.get(k) for k in ("torch", "deepspeed", "transformers", "sae_lens", "git_commit")}
    lines += ["", "## Versions", "", "| | training | export |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {export_versions.get(k)} |" for k, v in versions.items()]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _form_lines(form: str, model: dict) -> list[str]:
    """What the directory holds: a full model, a LoRA adapter (and the base it needs), or LoRA merged in."""
    lo, base = model.get("lora") or {}, f"`{model.get('name_or_path')}`"
    spec = f"r={lo.get('r')}, alpha={lo.get('alpha')}, target_modules={lo.get('target_modules')}"
    if form == "adapter":
        return [
            f"This directory is a **PEFT LoRA adapter** ({spec}), not a whole model. It needs the base model "
            f"{base}: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_DIR)`.",
            "",
        ]
    if form == "merged":
        return [f"This directory is a **merged model**: LoRA adapters ({spec}) merged into the base model {base}.", ""]
    return ["This directory is a full model (every weight trained).", ""]


def write(tag_dir: Path, out: Path, step: int, export_versions: dict, form: str = "full") -> None:
    """Write out/README.md for the checkpoint at tag_dir (run directory = tag_dir/../..)."""
    run_dir = tag_dir.parent.parent
    recipe = yaml.safe_load((tag_dir / "recipe.yaml").read_text()) if (tag_dir / "recipe.yaml").is_file() else {}
    info_path = run_dir / "run_info.json"
    run_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    card = render(
        recipe or {}, step, run_info, metrics.last_eval(run_dir / "metrics.jsonl", step), export_versions, form
    )
    (out / "README.md").write_text(card)
