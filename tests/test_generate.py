"""`fpo-ds generate`: answer files each benchmark's own reader accepts, complete and in question order.

The readers below restate what each tool's loader does with an answer file (which fields it
reads, what it keys by), not their code: AlpacaEval merges model outputs with its reference
outputs on `instruction` and names the model after the one `generator`; Arena-Hard-Auto's
`load_model_answers` keys each `model_answer/<model>.jsonl` by `uid`, its judge reads
`messages[-1]["content"]["answer"]` and its style control sums `metadata` (token_len first);
FastChat's keys `model_answer/<model>.jsonl` by `question_id`, checks every question has an
answer, and judges `choices[0]["turns"][t]` for each turn t of the question.
"""

import json
import shutil
import time
from pathlib import Path

import pytest

from fpo_ds import answer_formats as F
from fpo_ds import cli
from fpo_ds import generate as G
from fpo_ds.pipeline import torchrun

FIXTURES = Path(__file__).parent / "fixtures"
QUESTIONS = {
    "alpaca_eval": FIXTURES / "alpaca_eval.json",
    "arena_hard": FIXTURES / "arena_hard_question.jsonl",
    "mt_bench": FIXTURES / "mt_bench_question.jsonl",
}


def read_alpaca_eval(path: Path, instruction_list: list[dict]) -> tuple[str, list[str]]:
    """(model name, outputs in the instruction list's order), merged on instruction as AlpacaEval does."""
    outputs = json.loads(path.read_text())
    assert isinstance(outputs, list) and all(isinstance(r["output"], str) for r in outputs)
    names = {r["generator"] for r in outputs}
    assert len(names) == 1, f"one generator per model_outputs file, got {names}"
    by_instruction: dict[str, list[dict]] = {}
    for r in outputs:
        by_instruction.setdefault(r["instruction"], []).append(r)
    assert sorted(by_instruction) == sorted(q["instruction"] for q in instruction_list), "instructions differ"
    assert all(len(rows) == 1 for rows in by_instruction.values()), "an instruction answered twice"
    for q in instruction_list:
        if "dataset" in q:
            assert by_instruction[q["instruction"]][0]["dataset"] == q["dataset"]
    return names.pop(), [by_instruction[q["instruction"]][0]["output"] for q in instruction_list]


def load_answer_dir(answer_dir: Path, key: str) -> dict[str, dict]:
    """Model name (the file name) -> {key: answer row}, as both tools' load_model_answers build it."""
    models = {}
    for file in sorted(answer_dir.glob("*.jsonl")):
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        models[file.name[: -len(".jsonl")]] = {r[key]: r for r in rows}
    return models


def read_arena_hard(answer_dir: Path, model: str, questions: list[dict]) -> list[str]:
    """The answers a judgment reads, per question in order; the style features show_result builds."""
    answers = load_answer_dir(answer_dir, "uid")[model]
    assert len(answers) == len(questions)
    texts = []
    for q in questions:
        a = answers[q["uid"]]
        assert a["model"] == model and isinstance(a["ans_id"], str) and isinstance(a["tstamp"], float)
        assert a["messages"][0] == {"role": "user", "content": q["prompt"]}
        assert a["messages"][-1]["role"] == "assistant"
        texts.append(a["messages"][-1]["content"]["answer"])
        features = [v if isinstance(v, int) else sum(v.values()) for v in a["metadata"].values()]
        assert list(a["metadata"])[0] == "token_len" and len(features) == 4
        assert all(isinstance(f, int) and f >= 0 for f in features)
    return texts


def read_mt_bench(answer_dir: Path, model: str, questions: list[dict]) -> list[list[str]]:
    answers = load_answer_dir(answer_dir, "question_id")[model]
    out = []
    for q in questions:
        assert q["question_id"] in answers, f"Missing model {model}'s answer to Question {q['question_id']}"
        a = answers[q["question_id"]]
        assert a["model_id"] == model and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        assert a["choices"][0]["index"] == 0
        out.append([a["choices"][0]["turns"][t] for t in range(len(q["turns"]))])
    return out


def rows(fmt: str) -> list[dict]:
    path = QUESTIONS[fmt]
    if fmt == "alpaca_eval":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_answers(questions: list[F.Question]) -> list[F.Answer]:
    texts = [tuple(f"answer {i}.{t} **bold**\n- item" for t in range(len(q.turns))) for i, q in enumerate(questions)]
    return [F.Answer(t, tuple(5 + i for i in range(len(t))), True) for t in texts]


def written(fmt: str, out: Path, model: str = "tiny-fpo") -> tuple[list[F.Question], list[F.Answer], Path]:
    questions = F.read_questions(fmt, QUESTIONS[fmt])
    answers = fake_answers(questions)
    path = F.answer_path(fmt, out, model, questions)
    G.write_answers(path, F.serialise(fmt, F.LAYOUTS[fmt].records(questions, answers, model, 1.5)), {})
    return questions, answers, path


def test_alpaca_eval_writer_round_trips(tmp_path):
    questions, answers, path = written("alpaca_eval", tmp_path)
    assert path == tmp_path / "alpaca_eval" / "tiny-fpo" / "model_outputs.json"
    name, outputs = read_alpaca_eval(path, rows("alpaca_eval"))
    assert name == "tiny-fpo" and outputs == [a.texts[0] for a in answers]
    assert [r["instruction"] for r in json.loads(path.read_text())] == [q.key for q in questions]  # input order
    assert json.loads(path.read_text())[3]["instruction"] == "Convert 72 °F to Celsius."  # unicode kept as is


def test_arena_hard_writer_round_trips(tmp_path):
    questions, answers, path = written("arena_hard", tmp_path)
    assert path == tmp_path / "arena-hard-v2.0" / "model_answer" / "tiny-fpo.jsonl"
    assert read_arena_hard(path.parent, "tiny-fpo", rows("arena_hard")) == [a.texts[0] for a in answers]
    order = [json.loads(line)["uid"] for line in path.read_text().splitlines()]
    assert order == [r["uid"] for r in rows("arena_hard")]
    first = json.loads(path.read_text().splitlines()[0])["metadata"]
    assert first["token_len"] == 5 and first["bold_count"]["**"] == 1 and first["list_count"]["unordered"] == 1


def test_mt_bench_writer_round_trips(tmp_path):
    questions, answers, path = written("mt_bench", tmp_path)
    assert path == tmp_path / "mt_bench" / "model_answer" / "tiny-fpo.jsonl"
    assert read_mt_bench(path.parent, "tiny-fpo", rows("mt_bench")) == [list(a.texts) for a in answers]
    order = [json.loads(line)["question_id"] for line in path.read_text().splitlines()]
    assert order == [81, 93, 111, 125, 141]


def test_answer_ids_follow_the_answer():
    q = F.Question(1, ("hi",), {})
    a, b = F.Answer(("x",), (1,), True), F.Answer(("y",), (1,), True)
    assert F.answer_id("m", q.key, a) == F.answer_id("m", q.key, a) != F.answer_id("m", q.key, b)
    assert len(F.answer_id("m", q.key, a)) == 22


def test_markdown_counts_skip_code_blocks():
    text = "# Title\n## Part\n1. one\n2. two\n- a\n* b\n**x** and __y__\n```\n# not a header\n- not an item\n```\n"
    counts = F.markdown_counts(text)
    assert counts["header_count"] == {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
    assert counts["list_count"] == {"ordered": 2, "unordered": 2}
    assert counts["bold_count"] == {"**": 1, "__": 1}


def test_arena_hard_v01_set_goes_to_its_bench(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"uid": "a1", "category": "arena-hard-v0.1", "cluster": "c", "prompt": "Hi"}) + "\n")
    questions = F.read_questions("arena_hard", path)
    assert F.answer_path("arena_hard", tmp_path, "m", questions).parent.parent.name == "arena-hard-v0.1"
    assert any("--category arena-hard-v0.1" in c for c in F.judge_commands("arena_hard", path, "m", questions))


@pytest.mark.parametrize(
    "fmt,content,message",
    [
        ("mt_bench", '{"question_id": 1, "turns": ["a", "b"]}\n{"question_id": 2}\n', "line 2: 'turns' is None"),
        ("mt_bench", '{"question_id": 1, "turns": ["a"]}\n\n{"turns": ["b"]}\n', "line 3: no 'question_id' field"),
        ("mt_bench", '{"question_id": 1, "turns": ["a"]}\n{"question_id": 1, "turns": ["b"]}\n', "questions 1 and 2"),
        ("arena_hard", '{"uid": "u", "category": "hard_prompt"}\n', "line 1: no 'prompt' field"),
        ("arena_hard", '{"question_id": "q", "turns": [{"content": "hi"}]}\n', "pre-v2.0 arena-hard-auto layout"),
        ("arena_hard", '{"uid": "u", "prompt": "p", "category": "c"}\n{"uid": "u"\n', "line 2: not JSON"),
        ("alpaca_eval", '[{"instruction": "a"}, {"input": "b"}]', "row 1: no 'instruction' field"),
        ("alpaca_eval", "[]", "no questions"),
    ],
)
def test_bad_question_files_name_the_row(tmp_path, fmt, content, message):
    path = tmp_path / "questions.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        F.read_questions(fmt, path)
    assert str(e.value).startswith(f"{path}: ")


def test_cli_checks_the_question_file_before_loading_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such question file"):
        cli.main(["generate", str(tmp_path / "no-model"), "--format", "mt_bench", "--questions", "nope.jsonl",
                  "--out", str(tmp_path), "--model-id", "m"])  # fmt: skip
    questions = tmp_path / "q.jsonl"
    questions.write_text(QUESTIONS["mt_bench"].read_text())
    with pytest.raises(FileNotFoundError, match="MODEL_DIR: .*no-model is not a directory"):  # its own argument's name
        cli.main(["generate", str(tmp_path / "no-model"), "--format", "mt_bench", "--questions", str(questions),
                  "--out", str(tmp_path), "--model-id", "m"])  # fmt: skip
    with pytest.raises(SystemExit):  # formats and question files come in pairs
        G.parse(["m", "--format", "mt_bench", "--format", "arena_hard", "--questions", "q", "--out", "o",
                 "--model-id", "m"])  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_merge_back_in_question_order(n, world):
    items = list(range(n))
    parts = [G.shard(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items and G.merge(parts) == items


def test_second_turn_is_asked_with_the_first_answer():
    seen = []

    def fake(convs):
        seen.append([list(c) for c in convs])
        return [(f"A{len(c)}:{c[-1]['content']}", 3, True) for c in convs]

    questions = [F.Question(1, ("q1", "q2"), {}), F.Question(2, ("r1",), {})]
    answers = G.answer(questions, fake)
    assert [len(batch) for batch in seen] == [2, 1]  # turn 2 asks only the two-turn question
    assert seen[1][0] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "A1:q1"},
        {"role": "user", "content": "q2"},
    ]
    assert answers[0].texts == ("A1:q1", "A3:q2") and answers[1].texts == ("A1:r1",)


def test_without_vllm_hf_generate_is_used_and_said(monkeypatch):
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: None)
    assert G.pick_backend("auto", 1, cuda=True) == ("hf", "vllm not installed: using HF generate")
    with pytest.raises(ValueError, match="pip install 'fpo-ds\\[vllm\\]'"):
        G.pick_backend("vllm", 1, cuda=True)


def test_vllm_is_refused_under_a_launcher(monkeypatch):
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: object())
    assert G.pick_backend("auto", 1, cuda=True)[0] == "vllm"
    assert G.pick_backend("auto", 2, cuda=True)[0] == "hf"
    with pytest.raises(ValueError, match="--tensor-parallel-size"):
        G.pick_backend("vllm", 2, cuda=True)


def _cmd(model_dir: Path, out: Path) -> list[str]:
    args = [str(model_dir), "--out", str(out), "--model-id", "tiny-fpo", "--max-new-tokens", "8", "--batch-size", "3"]
    for fmt, path in QUESTIONS.items():
        args += ["--format", fmt, "--questions", str(path)]
    return args


def _files(out: Path) -> dict[str, list]:
    """Every answer file under out, parsed, without the time stamps."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.suffix in (".json", ".jsonl") and not path.name.endswith(".settings.json"):
            text = path.read_text()
            recs = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
            files[str(path.relative_to(out))] = [{k: v for k, v in r.items() if k != "tstamp"} for r in recs]
    return files


@pytest.mark.multiproc
def test_two_ranks_write_what_one_process_writes(world, tmp_path, capsys):
    """torchrun, 2 ranks, HF generate, all three formats in one launch == one process without a launcher."""
    from helpers import subprocess_env

    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    proc = torchrun(["-m", "fpo_ds.generate", *_cmd(model, tmp_path / "ranks2")], 2, env=subprocess_env(),
                    capture=True, timeout=300)  # fmt: skip
    assert "vllm not installed: using HF generate" in proc.stdout
    cli.main(["generate", *_cmd(model, tmp_path / "single")])
    two, one = _files(tmp_path / "ranks2"), _files(tmp_path / "single")
    assert sorted(two) == [
        "alpaca_eval/tiny-fpo/model_outputs.json",
        "arena-hard-v2.0/model_answer/tiny-fpo.jsonl",
        "mt_bench/model_answer/tiny-fpo.jsonl",
    ]
    assert two == one
    out = tmp_path / "ranks2"
    _, outputs = read_alpaca_eval(out / "alpaca_eval/tiny-fpo/model_outputs.json", rows("alpaca_eval"))
    arena = read_arena_hard(out / "arena-hard-v2.0/model_answer", "tiny-fpo", rows("arena_hard"))
    mt = read_mt_bench(out / "mt_bench/model_answer", "tiny-fpo", rows("mt_bench"))
    assert len(outputs) == 5 and len(arena) == 5 and [len(t) for t in mt] == [2] * 5
    assert any(outputs) and any(t for turns in mt for t in turns)  # the model said something
    settings = json.loads((out / "mt_bench/model_answer/tiny-fpo.jsonl.settings.json").read_text())
    assert settings["world_size"] == 2 and settings["do_sample"] is False and settings["max_new_tokens"] == 8
    assert settings["dtype"] == "float32" and settings["backend"] == "hf" and settings["n_questions"] == 5
    for line in (f"alpaca_eval evaluate --model_outputs {out}/alpaca_eval/tiny-fpo/model_outputs.json",
                 f"cp {out}/mt_bench/model_answer/tiny-fpo.jsonl data/mt_bench/model_answer/",
                 "python show_result.py --bench-name mt_bench --model-list tiny-fpo",
                 "python gen_judgment.py --setting-file config/arena-hard-v2.0.yaml"):  # fmt: skip
        assert line in proc.stdout


@pytest.mark.multiproc
def test_two_ranks_refuse_an_unwritable_out_before_loading_the_model_in_one_message(world, tmp_path):
    from helpers import subprocess_env

    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "answers"  # under a file: nothing can be written there, not even by root
    t0 = time.time()
    proc = torchrun(["-m", "fpo_ds.generate", *_cmd(world / "model", out)], 2, env=subprocess_env(), capture=True,
                    timeout=300, check=False)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and text.count("] FAILED:") == 1, text[-3000:]
    assert f"FAILED: OSError: --out: cannot write in {out}" in text and "before the model loads" in text
    assert "Loading weights" not in text and "fpo_ds/" not in text.split("FAILED")[-1], text[-3000:]
    assert time.time() - t0 < 60
