"""`fpo-ds generate`: answer benchmark questions with a model, into the files each benchmark reads.

    fpo-ds generate MODEL_DIR --format alpaca_eval --questions alpaca_eval.json --out runs/answers --model-id fpo-2b
    torchrun --nproc_per_node 8 -m fpo_ds.generate MODEL_DIR --out runs/answers --model-id fpo-2b \
        --format mt_bench --questions mt_bench/question.jsonl --format arena_hard --questions question.jsonl

Several --format/--questions pairs share one launch (the model loads once). Every question file is
read and checked before the model loads. The model's chat template builds every prompt
(add_generation_prompt=True). HF generate: batched and left-padded, bf16 on GPU and fp32 on CPU
unless --dtype says otherwise; under a launcher rank r answers questions r, r+W, r+2W, ... and
rank 0 gathers the answers and writes them in question order. vLLM, when installed, answers in
one process instead (--tensor-parallel-size spreads a large model over GPUs). The decoding
settings go to `<answer file>.settings.json` beside each answer file; the files themselves hold
only what the benchmark's format has. Greedy decoding (--temperature 0, the default) gives the
same answers whatever the world size; sampled answers depend on the seed, the rank count and
the batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fpo_ds import answer_formats as F
from fpo_ds import dist, lora

Generate = Callable[[list[list[dict]]], list[tuple[str, int, bool]]]  # conversations -> (text, tokens, finished)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Decoding settings, recorded beside every answer file."""

    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    batch_size: int = 16  # prompts per generate call (HF backend)
    tensor_parallel_size: int = 1  # vLLM only

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def shard(items: list, rank: int, world: int) -> list:
    """Rank r's share: items r, r+W, r+2W, ... (long and short questions spread evenly)."""
    return items[rank::world]


def merge(parts: list[list]) -> list:
    """Inverse of shard: parts[r] is rank r's share; returns the items in their original order."""
    out: list = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def answer(questions: list[F.Question], generate: Generate) -> list[F.Answer]:
    """Ask every question's turns in order; each turn sees the conversation so far, earlier answers included."""
    convs: list[list[dict]] = [[] for _ in questions]
    got: list[list[tuple[str, int, bool]]] = [[] for _ in questions]
    for turn in range(max((len(q.turns) for q in questions), default=0)):
        todo = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        for i in todo:
            convs[i].append({"role": "user", "content": questions[i].turns[turn]})
        for i, out in zip(todo, generate([convs[i] for i in todo])):
            convs[i].append({"role": "assistant", "content": out[0]})
            got[i].append(out)
    return [F.Answer(tuple(t for t, _, _ in g), tuple(n for _, n, _ in g), all(f for _, _, f in g)) for g in got]


def answer_distributed(questions: list[F.Question], generate: Generate, rank: int, world: int) -> list | None:
    """Collective: each rank answers its share; rank 0 returns all answers in question order, others None."""
    mine = answer(shard(questions, rank, world), generate)
    if world == 1:
        return mine
    import torch.distributed as tdist

    parts = [None] * world if rank == 0 else None
    tdist.gather_object(mine, parts, dst=0)
    return merge(parts) if rank == 0 else None


def pick_backend(requested: str, world: int, cuda: bool) -> tuple[str, str]:
    """(backend, the line that says why): vllm when asked for or when `auto` finds it usable, else hf."""
    installed = importlib.util.find_spec("vllm") is not None
    if requested == "vllm":
        if not installed:
            raise ValueError("--backend vllm: vllm is not installed; pip install 'fpo-ds[vllm]', or use --backend hf")
        if world > 1:
            raise ValueError(
                f"--backend vllm runs in one process ({world} ranks launched): launch without torchrun and "
                "set --tensor-parallel-size to the GPU count, or use --backend hf for data-parallel ranks"
            )
        return "vllm", "backend: vllm"
    if requested == "hf":
        return "hf", "backend: HF generate"
    if not installed:
        return "hf", "vllm not installed: using HF generate"
    if world > 1:
        return "hf", f"vllm runs in one process, not under a launcher of {world} ranks: using HF generate"
    if not cuda:
        return "hf", "vllm needs a GPU: using HF generate"
    return "vllm", "backend: vllm"


def torch_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def stop_ids(tokenizer, generation_config) -> list[int]:
    """The ids that end an answer: the generation config's and the tokenizer's eos, and an end-of-turn token."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    for name in ("<end_of_turn>", "<|eot_id|>", "<|im_end|>"):  # Gemma, Llama 3, ChatML chat templates
        if name in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(name))
    return sorted(i for i in ids if i is not None)


def hf_backend(model_dir: str, s: Settings, device: str, seed: int) -> tuple[Generate, dict]:
    """HF generate, batched and left-padded; returns the generate function and what it recorded."""
    import torch

    from fpo_ds import model as M

    tok = M.load_tokenizer(model_dir)
    tok.padding_side = "left"
    dtype = torch_dtype(s.dtype, device.startswith("cuda"))
    model = lora.load_causal_lm(model_dir, dtype).to(device).eval()  # a model, or a LoRA adapter on its base
    stop = stop_ids(tok, model.generation_config)
    sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
    torch.manual_seed(seed)

    @torch.no_grad()
    def generate(convs: list[list[dict]]) -> list[tuple[str, int, bool]]:
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out: list = [None] * len(texts)
        for b in range(0, len(order), s.batch_size):
            idx = order[b : b + s.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc,
                **(sampling if s.do_sample else {"do_sample": False}),
                max_new_tokens=s.max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :].tolist()):
                end = next((k for k, t in enumerate(row) if t in stop), None)
                ids = row[:end] if end is not None else row
                out[i] = (tok.decode(ids, skip_special_tokens=True).strip(), len(ids), end is not None)
        return out

    template = hashlib.sha256(str(tok.chat_template).encode()).hexdigest()
    return generate, {
        "dtype": str(dtype).removeprefix("torch."),
        "stop_token_ids": stop,
        "chat_template_sha256": template,
    }


def vllm_backend(model_dir: str, s: Settings) -> tuple[Generate, dict]:
    """Answers by vLLM in this process; its `chat` applies the model's chat template with the generation prompt."""
    from vllm import LLM, SamplingParams

    dtype = "bfloat16" if s.dtype == "auto" else s.dtype
    llm = LLM(model=model_dir, tensor_parallel_size=s.tensor_parallel_size, dtype=dtype, seed=s.seed)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=s.seed)

    def generate(convs: list[list[dict]]) -> list[tuple[str, int, bool]]:
        outs = [o.outputs[0] for o in llm.chat(convs, params, use_tqdm=False)] if convs else []
        return [(o.text.strip(), len(o.token_ids), o.finish_reason == "stop") for o in outs]

    return generate, {"dtype": dtype}


def write_answers(path: Path, text: str, settings: dict) -> None:
    """The answer file (written whole, then renamed into place) and its settings sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, text), (Path(f"{path}.settings.json"), json.dumps(settings, indent=1) + "\n")):
        tmp = target.with_name(target.name + ".partial")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, target)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fpo-ds generate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory with a chat template (fpo-ds export)"
    )
    p.add_argument("--format", action="append", required=True, choices=F.FORMATS, help="repeat, one per --questions")
    p.add_argument("--questions", action="append", required=True, help="the benchmark's question file (repeat)")
    p.add_argument("--out", required=True, help="directory; answers go to <out>/<benchmark layout>/...")
    p.add_argument("--model-id", required=True, help="the model's name in the answer files and on the leaderboards")
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    p.add_argument("--temperature", type=float, default=Settings.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=Settings.top_p)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"])
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model")
    args = p.parse_args(argv)
    if len(args.format) != len(args.questions):
        p.error(f"{len(args.format)} --format but {len(args.questions)} --questions: give them in pairs")
    if not args.model_id or any(c in args.model_id for c in "/\\ "):
        p.error(f"--model-id {args.model_id!r}: a file name (the answer files are named after it): no '/', '\\', ' '")
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Before any model loads: MODEL_DIR is a model directory (or a hub id) and --out is writable.

    Errors name generate's own arguments. Every rank checks (cheap), before the ranks meet, so
    rank 0 alone reports it.
    """
    model, p = args.model_dir, Path(args.model_dir)
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or p.exists():  # a path, not a hub id
        if not p.is_dir():
            raise FileNotFoundError(
                f"MODEL_DIR: {model} is not a directory (under {Path.cwd()}); pass the Hugging Face model directory "
                "to answer with, e.g. one written by `fpo-ds export CHECKPOINT OUT`"
            )
        if not (p / "config.json").is_file() and not lora.is_adapter_dir(p):
            raise FileNotFoundError(
                f"MODEL_DIR: {model} has no config.json (nor a LoRA adapter's adapter_config.json): not a Hugging "
                "Face model directory (a checkpoint step directory needs `fpo-ds export` first)"
            )
    out = Path(args.out)
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"--out: cannot write in {out} ({e.strerror or type(e).__name__}); pick a writable --out "
            "(checked before the model loads, so no answer is lost)"
        ) from None


def settings_of(args: argparse.Namespace) -> Settings:
    keys = [f.name for f in dataclasses.fields(Settings)]
    return Settings(**{k: getattr(args, k) for k in keys})


def read_jobs(args: argparse.Namespace) -> list[tuple[str, Path, list[F.Question]]]:
    """(format, question file, questions) per --format/--questions pair; every file is checked here."""
    return [(fmt, Path(q), F.read_questions(fmt, q)) for fmt, q in zip(args.format, args.questions)]


def run(args: argparse.Namespace, jobs: list, rank: int, world: int, device: str) -> list[Path]:
    """Answer every question file; rank 0 writes them and returns their paths (other ranks: [])."""
    s = settings_of(args)
    backend, why = pick_backend(args.backend, world, device.startswith("cuda"))
    if backend == "vllm" and lora.is_adapter_dir(args.model_dir):
        if args.backend == "vllm":
            raise ValueError(
                f"--backend vllm: {args.model_dir} is a LoRA adapter; export it merged (fpo-ds export --form merged) "
                "for vLLM, or use --backend hf (which merges it into its base)"
            )
        backend, why = "hf", f"{args.model_dir} is a LoRA adapter: using HF generate (merged into its base)"
    dist.log(why)
    if backend == "vllm":
        gen, recorded = vllm_backend(args.model_dir, s)
    else:
        try:
            gen, recorded = hf_backend(args.model_dir, s, device, seed=s.seed + rank)
        except (OSError, ValueError) as e:  # the model loader speaks of a recipe's key; generate has MODEL_DIR
            if "model.name_or_path" not in str(e):
                raise
            raise type(e)(str(e).replace("model.name_or_path", "MODEL_DIR")) from None
    written, commands = [], []
    for fmt, qpath, questions in jobs:
        t0 = time.perf_counter()
        dist.log(f"generate: {fmt}: {len(questions)} questions from {qpath} on {world} rank(s)")
        answers = answer_distributed(questions, gen, rank, world)
        if rank != 0:
            continue
        path = F.answer_path(fmt, Path(args.out), args.model_id, questions)
        records = F.LAYOUTS[fmt].records(questions, answers, args.model_id, time.time())
        cut = sum(not a.finished for a in answers)
        meta = {
            **dataclasses.asdict(s),
            "do_sample": s.do_sample,
            "backend": backend,
            **recorded,
            "world_size": world,
            "model_dir": str(args.model_dir),
            "model_id": args.model_id,
            "format": fmt,
            "questions": str(qpath),
            "questions_sha256": hashlib.sha256(qpath.read_bytes()).hexdigest(),
            "n_questions": len(questions),
            "answers_cut_at_max_new_tokens": cut,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_answers(path, F.serialise(fmt, records), meta)
        dist.log(f"wrote {path} ({len(records)} answers, {cut} cut at --max-new-tokens {s.max_new_tokens})")
        written.append(path)
        commands += ["", *F.judge_commands(fmt, path, args.model_id, questions)]
    if commands:
        dist.log("\n".join(["", "judge commands:", *commands[1:]]))
    return written


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dist.report_failures()
    args = parse(argv)
    jobs = read_jobs(args)  # before any model loads
    check_paths(args)
    topo = dist.discover()
    import torch

    device = f"cuda:{topo.local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    if topo.world_size > 1:
        dist.init(timeout_minutes=60)
    run(args, jobs, topo.rank, topo.world_size, device)
    if topo.world_size > 1:
        dist.shutdown(0)


if __name__ == "__main__":
    main()
