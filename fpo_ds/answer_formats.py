"""Benchmark question files in; the answer files each benchmark's own reader takes, unchanged.

Layouts (as each tool's public loader reads them):
  alpaca_eval  AlpacaEval 2 (tatsu-lab/alpaca_eval). In: a JSON list of {instruction, (dataset), ...}.
               Out: `alpaca_eval/<model>/model_outputs.json`, a JSON list of {instruction, output,
               generator, (dataset)} in input order; alpaca_eval merges it with its reference
               outputs on `instruction` and names the model after `generator`.
  arena_hard   Arena-Hard-Auto, the current layout (lmarena/arena-hard-auto since v2.0; its
               arena-hard-v0.1 set uses it too). In: question.jsonl rows {uid, category,
               (subcategory), prompt}. Out: `<bench>/model_answer/<model>.jsonl` rows {uid, ans_id,
               model, messages: [user, {role: assistant, content: {answer}}], tstamp, metadata};
               gen_judgment keys answers by uid and reads messages[-1]["content"]["answer"], and
               show_result's style control reads metadata (token_len, header/list/bold counts).
  mt_bench     MT-Bench (lm-sys/FastChat llm_judge). In: question.jsonl rows {question_id,
               category, turns: [str, str]}. Out: `mt_bench/model_answer/<model>.jsonl` rows
               {question_id, answer_id, model_id, choices: [{index: 0, turns: [answer1, answer2]}],
               tstamp}; the second turn is asked with the first answer in the conversation.

Answer files keep the question file's order. Answer ids hash the model, question and answer, so
equal answers give equal files (up to `tstamp`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

FORMATS = ("alpaca_eval", "arena_hard", "mt_bench")


class Question(NamedTuple):
    key: str | int  # what the benchmark keys answers by (AlpacaEval: the instruction)
    turns: tuple[str, ...]  # user turns, asked in order, each with the previous answers in the conversation
    row: dict  # the question file's row as read


class Answer(NamedTuple):
    texts: tuple[str, ...]  # one per turn
    n_tokens: tuple[int, ...]  # generated tokens per turn (the model's tokenizer), end-of-turn token excluded
    finished: bool  # every turn ended with a stop token before max_new_tokens


def _fail(path: Path, where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{path}: {where}: {problem}; {fix}")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSON-lines file."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, f"line {n}", f"not JSON ({e.msg})", "one JSON object per line") from None
        if not isinstance(row, dict):
            raise _fail(path, f"line {n}", f"a {type(row).__name__}, not an object", "one JSON object per line")
        rows.append((n, row))
    return rows


def _read_json_list(path: Path) -> list[tuple[int, dict]]:
    """(row index, row) of a JSON list of objects (JSON lines accepted too)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"line {e.lineno}", f"not JSON ({e.msg})", "a JSON list of objects") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _fail(path, f"row {i}", f"a {type(row).__name__}, not an object", "a JSON list of objects")
    return list(enumerate(rows))


def _text(path: Path, where: str, row: dict, key: str, layout: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = f"no '{key}' field" if key not in row else f"'{key}' is {value!r}, not a non-empty string"
        raise _fail(path, where, problem, f"each row needs it ({layout})")
    return value


def _unique(path: Path, questions: list[Question], what: str) -> list[Question]:
    if not questions:
        raise _fail(path, "file", "no questions", "give the benchmark's question file")
    seen: dict = {}
    for i, q in enumerate(questions):
        if q.key in seen:
            where = f"questions {seen[q.key] + 1} and {i + 1} (in file order)"
            raise _fail(path, where, f"the same {what} {q.key!r}", f"the benchmark keys answers by {what}")
        seen[q.key] = i
    return questions


def alpaca_eval_questions(path: Path) -> list[Question]:
    layout = "AlpacaEval's instruction list: [{instruction, dataset, ...}]"
    rows = _read_json_list(path)
    qs = [Question(_text(path, f"row {i}", r, "instruction", layout), (r["instruction"],), r) for i, r in rows]
    return _unique(path, qs, "instruction")


def arena_hard_questions(path: Path) -> list[Question]:
    layout = "Arena-Hard-Auto question.jsonl: {uid, category, subcategory, prompt}"
    out = []
    for n, r in _read_jsonl(path):
        if "uid" not in r and "question_id" in r and "turns" in r:
            fix = "take question.jsonl from a current lmarena/arena-hard-auto checkout (uid/prompt)"
            raise _fail(path, f"line {n}", "question_id/turns is the pre-v2.0 arena-hard-auto layout", fix)
        if not isinstance(r.get("uid"), str) or not r["uid"]:
            raise _fail(path, f"line {n}", f"'uid' is {r.get('uid')!r}", f"each row needs a string uid ({layout})")
        _text(path, f"line {n}", r, "category", layout)
        out.append(Question(r["uid"], (_text(path, f"line {n}", r, "prompt", layout),), r))
    return _unique(path, out, "uid")


def mt_bench_questions(path: Path) -> list[Question]:
    layout = "MT-Bench question.jsonl: {question_id, category, turns: [first, second]}"
    out = []
    for n, r in _read_jsonl(path):
        if "question_id" not in r:
            raise _fail(path, f"line {n}", "no 'question_id' field", f"each row needs it ({layout})")
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise _fail(path, f"line {n}", f"'turns' is {turns!r}", f"a list of non-empty strings ({layout})")
        out.append(Question(r["question_id"], tuple(turns), r))
    return _unique(path, out, "question_id")


def answer_id(model_id: str, key, answer: Answer) -> str:
    """22 hex digits (the length of the tools' own shortuuid ids) of hash(model, question, answer)."""
    return hashlib.sha256(json.dumps([model_id, key, answer.texts]).encode()).hexdigest()[:22]


def markdown_counts(text: str) -> dict:
    """Headers (by level), list items and bold spans outside code blocks: Arena-Hard's style features."""
    text = re.sub(r"```[^`]*```", "", text)

    def lines(pattern: str) -> int:
        return len(re.findall(pattern, text, re.MULTILINE))

    return {
        "header_count": {f"h{k}": lines(rf"^#{{{k}}}\s") for k in range(1, 7)},
        "list_count": {"ordered": lines(r"^\s*\d+\.\s"), "unordered": lines(r"^\s*[-*+]\s")},
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)), "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def alpaca_eval_records(questions: list[Question], answers: list[Answer], model_id: str, tstamp: float) -> list:
    out = []
    for q, a in zip(questions, answers):
        rec = {"instruction": q.row["instruction"], "output": a.texts[0], "generator": model_id}
        if "dataset" in q.row:
            rec["dataset"] = q.row["dataset"]
        out.append(rec)
    return out


def arena_hard_records(questions: list[Question], answers: list[Answer], model_id: str, tstamp: float) -> list:
    return [
        {
            "uid": q.key,
            "ans_id": answer_id(model_id, q.key, a),
            "model": model_id,
            "messages": [
                {"role": "user", "content": q.turns[0]},
                {"role": "assistant", "content": {"answer": a.texts[0]}},
            ],
            "tstamp": tstamp,
            # token_len first: show_result reads the features in this order (length, then markdown)
            "metadata": {"token_len": a.n_tokens[0], **markdown_counts(a.texts[0])},
        }
        for q, a in zip(questions, answers)
    ]


def mt_bench_records(questions: list[Question], answers: list[Answer], model_id: str, tstamp: float) -> list:
    return [
        {
            "question_id": q.key,
            "answer_id": answer_id(model_id, q.key, a),
            "model_id": model_id,
            "choices": [{"index": 0, "turns": list(a.texts)}],
            "tstamp": tstamp,
        }
        for q, a in zip(questions, answers)
    ]


def arena_hard_bench(questions: list[Question]) -> str:
    """The bench directory name: arena-hard-v0.1 when every category says so, else arena-hard-v2.0."""
    cats = {q.row["category"] for q in questions}
    return "arena-hard-v0.1" if cats == {"arena-hard-v0.1"} else "arena-hard-v2.0"


def answer_path(fmt: str, out_dir: Path, model_id: str, questions: list[Question]) -> Path:
    """Where the answers go under out_dir, in the directory layout the benchmark's own checkout uses."""
    if fmt == "alpaca_eval":
        return out_dir / "alpaca_eval" / model_id / "model_outputs.json"
    bench = arena_hard_bench(questions) if fmt == "arena_hard" else "mt_bench"
    return out_dir / bench / "model_answer" / f"{model_id}.jsonl"


def serialise(fmt: str, records: list[dict]) -> str:
    if fmt == "alpaca_eval":
        return json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


class Format(NamedTuple):
    read: Callable[[Path], list[Question]]
    records: Callable[[list[Question], list[Answer], str, float], list[dict]]


LAYOUTS = {
    "alpaca_eval": Format(alpaca_eval_questions, alpaca_eval_records),
    "arena_hard": Format(arena_hard_questions, arena_hard_records),
    "mt_bench": Format(mt_bench_questions, mt_bench_records),
}


def read_questions(fmt: str, path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such question file (--questions, for --format {fmt})")
    return LAYOUTS[fmt].read(path)


ARENA_JUDGE = {"arena-hard-v2.0": "gpt-4.1", "arena-hard-v0.1": "gpt-4-1106-preview"}  # each config's judge_model


def judge_commands(fmt: str, path: Path, model_id: str, questions: list[Question]) -> list[str]:
    """The command lines that judge the answer file at `path` (comments say where to run them)."""
    if fmt == "alpaca_eval":
        return [
            "# AlpacaEval 2 (pip install alpaca-eval; OPENAI_API_KEY set); length-controlled win rate included:",
            f"alpaca_eval evaluate --model_outputs {path} --annotators_config weighted_alpaca_eval_gpt4_turbo",
        ]
    if fmt == "mt_bench":
        return [
            "# MT-Bench, in lm-sys/FastChat's fastchat/llm_judge (pip install -e '.[model_worker,llm_judge]'; "
            "OPENAI_API_KEY set):",
            f"mkdir -p data/mt_bench/model_answer && cp {path} data/mt_bench/model_answer/",
            f"python gen_judgment.py --bench-name mt_bench --model-list {model_id} --parallel 2",
            f"python show_result.py --bench-name mt_bench --model-list {model_id}",
        ]
    bench = arena_hard_bench(questions)
    lines = [
        f"# Arena-Hard-Auto ({bench}), in a lmarena/arena-hard-auto checkout whose data/{bench}/model_answer/ holds "
        "the baselines' answers (its Hugging Face dataset lmarena-ai/arena-hard-auto); judge endpoint in "
        "config/api_config.yaml:",
        f"cp {path} data/{bench}/model_answer/",
        f"echo '  - {model_id}' >> config/{bench}.yaml   # model_list is the file's last key",
        f"python utils/add_markdown_info.py --dir data/{bench}/model_answer --output-dir data/{bench}/model_answer"
        "   # token_len in the judge's tokens, like the baselines' (style control)",
        f"python gen_judgment.py --setting-file config/{bench}.yaml --endpoint-file config/api_config.yaml",
    ]
    judge = ARENA_JUDGE[bench]
    for cat in dict.fromkeys(q.row["category"] for q in questions):
        style = " --control-features markdown length" if cat == "hard_prompt" else ""
        lines.append(f"python show_result.py --benchmark {bench} --judge-names {judge} --category {cat}{style}")
    return lines
