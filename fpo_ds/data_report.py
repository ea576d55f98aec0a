"""`fpo-ds data RECIPE [overrides] [--show N]`: what the model will see, before any GPU is used.

    fpo-ds data recipes/tiny.yaml --show 2

Tokenises through the same cached path as training (a large set shows datasets' progress bar
with its rate and ETA; the result is reused by the run), then prints per source the rows read
and kept, the drops per reason with example row ids, token-length percentiles of prompt, chosen
and rejected, the share of pairs truncated and the tokens lost, and the padding share under the
recipe's micro-batch. `--show N` renders N pairs through the chat template with the tokens that
enter the loss between « and ».
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fpo_ds import config as C
from fpo_ds import data, tokenized

PERCENTILES = (50, 90, 99, 100)


def percentiles(values: list[int]) -> list[int]:
    """Nearest-rank percentiles of `values` (100: the maximum)."""
    v = sorted(values)
    return [v[min(len(v) - 1, max(0, -(-p * len(v) // 100) - 1))] for p in PERCENTILES] if v else [0] * 4


def length_table(kept: list[tuple]) -> list[str]:
    """Lines: p50/p90/p99/max of each part's tokens as trained (and before truncation)."""
    lines = [f"  {'tokens':<10}" + "".join(f"{'p' + str(p) if p < 100 else 'max':>8}" for p in PERCENTILES)]
    for i, part in enumerate(("prompt", "chosen", "rejected")):
        kept_len = percentiles([len(k[i]) for k in kept])
        full_len = percentiles([k[3][i] for k in kept])
        lines.append(
            f"  {part:<10}"
            + "".join(f"{x:>8}" for x in kept_len)
            + "   (before truncation: "
            + " ".join(str(x) for x in full_len)
            + ")"
        )
    return lines


def truncation(kept: list[tuple]) -> str:
    """Share of pairs truncated and tokens lost (prompt from the left, responses from the right)."""
    cut = [k for k in kept if [len(k[0]), len(k[1]), len(k[2])] != list(k[3])]
    lost = sum(sum(k[3]) - len(k[0]) - len(k[1]) - len(k[2]) for k in kept)
    total = sum(sum(k[3]) for k in kept)
    return (
        f"truncated: {len(cut)} of {len(kept)} pairs ({100 * len(cut) / max(1, len(kept)):.1f}%), "
        f"{lost} of {total} tokens lost ({100 * lost / max(1, total):.1f}%)"
    )


def padding(pairs: list[data.Pair], train_cfg, world: int) -> str:
    """Padding share of one epoch's micro-batches, grouped by length as training groups them."""
    g, micro = train_cfg.global_batch_size, train_cfg.micro_batch_size
    steps = len(pairs) // g
    if steps == 0 or g % (micro * world):
        return f"padding: not computed (global batch {g} vs {len(pairs)} pairs, micro {micro} x world {world})"
    lengths = [data.padded_length(p) for p in pairs]
    plans = [data.micro_batches(len(pairs), 0, s, g, micro, world, lengths) for s in range(steps)]
    share = data.padding_fraction(pairs, plans)
    return f"padding: {100 * share:.1f}% of token positions under micro-batch {micro} x world {world} ({steps} steps)"


def render(tokenizer, pair: data.Pair) -> list[str]:
    """The pair as the model reads it: prompt text, then each response with its loss tokens in « »."""
    prompt = tokenizer.decode(pair.prompt_ids)
    out = [f"--- row {pair.example_id}: {len(pair.prompt_ids)} prompt tokens (not in the loss)"]
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        out.append(f"[{name}: {len(ids)} tokens in the loss]")
        out.append(prompt + "«" + tokenizer.decode(ids) + "»")
    return out


def report(recipe: C.Recipe, show: int, world: int, say=print) -> dict:
    from fpo_ds import model as M

    tok = M.load_tokenizer(recipe.model.name_or_path, recipe.model.revision)
    procs = len(os.sched_getaffinity(0))

    def prepare(sel, path, key, build):
        tokenized.ensure(path, key, lambda: build(num_proc=procs), say)

    loaded = data.load(recipe.data, tok, "train", say, prepare)
    say("")
    kept_all = []
    for s in loaded.sources:
        ids, p, c, r, bad, _, full = tokenized.read(Path(s["tokenized"]), len(tok))
        kept = [(pi, ci, ri, fi) for pi, ci, ri, b, fi in zip(p, c, r, bad, full) if not b]
        kept_all += kept
        say(f"{s['source']}: {s['rows_read']} rows read, {s['rows_selected']} selected, {s['pairs_kept']} kept")
        say(f"  formats: {data.describe_formats(s['formats'], 'auto')}")
        for reason, d in s["dropped"].items():
            say(f"  dropped [{reason}]: {d['rows']} row(s), e.g. row ids {d['example_ids']}")
    say("")
    say("token lengths of kept pairs, as trained:")
    for line in length_table(kept_all):
        say(line)
    say(truncation(kept_all))
    say(padding(loaded.pairs, recipe.train, world))
    if data.has_eval(recipe.data):
        held = data.load(recipe.data, tok, "eval", lambda message: None, prepare)
        dropped = sum(d["rows"] for s in held.sources for d in s["dropped"].values())
        say(f"held-out: {len(held.pairs)} pairs of {data.rows_source(recipe.data, 'eval')} ({dropped} rows dropped)")
    for pair in loaded.pairs[:show]:
        say("")
        for line in render(tok, pair):
            say(line)
    return {"pairs": len(loaded.pairs), "sources": loaded.sources}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fpo-ds data", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="render N pairs with their loss tokens marked")
    ap.add_argument("--world", type=int, default=1, help="ranks the padding estimate assumes (default 1)")
    args = ap.parse_args(argv)
    recipe = C.load(args.recipe, args.overrides)
    report(recipe, args.show, args.world)


if __name__ == "__main__":
    main()
