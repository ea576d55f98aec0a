"""Row formats, shaped exactly like the public sets' rows (written here, nothing downloaded)."""

import pytest

from fpo_ds import data as D
from fpo_ds import data_formats as F

Q, A, B = "What is 2 + 3?", "The answer is 5.", "The answer is 6."
STANDARD = {"prompt": Q, "chosen": A, "rejected": B}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# HuggingFaceH4/ultrafeedback_binarized (train_prefs): its columns and key order
ULTRAFEEDBACK = {
    "prompt": Q,
    "prompt_id": "6c5b8e0e1c3f4a0f9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b",
    "chosen": [{"content": Q, "role": "user"}, {"content": A, "role": "assistant"}],
    "rejected": [{"content": Q, "role": "user"}, {"content": B, "role": "assistant"}],
    "messages": [{"content": Q, "role": "user"}, {"content": A, "role": "assistant"}],
    "score_chosen": 8.0,
    "score_rejected": 5.0,
}
# Anthropic/hh-rlhf: two whole transcripts
HH = {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {A}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {B}"}
# TRL's conversational preference format, explicit prompt (TRL's dataset-format docs)
TRL_EXPLICIT = {"prompt": [user(Q)], "chosen": [assistant(A)], "rejected": [assistant(B)]}
# trl-lib/ultrafeedback_binarized: implicit prompt, whole conversations, scores
TRL_IMPLICIT = {
    "chosen": [user(Q), assistant(A)],
    "rejected": [user(Q), assistant(B)],
    "score_chosen": 8.0,
    "score_rejected": 5.0,
}
# HuggingFaceH4/ultrachat_200k (train_sft)
ULTRACHAT = {
    "prompt": Q,
    "prompt_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "messages": [
        {"content": "Hi.", "role": "user"},
        {"content": "Hello.", "role": "assistant"},
        {"content": Q, "role": "user"},
        {"content": A, "role": "assistant"},
    ],
}


@pytest.mark.parametrize(
    "row,fmt",
    [
        (STANDARD, "standard"),
        (ULTRAFEEDBACK, "ultrafeedback"),
        (HH, "implicit"),
        (TRL_EXPLICIT, "conversational"),
        (TRL_IMPLICIT, "conversational_implicit"),
    ],
)
def test_public_preference_shapes_give_the_string_rows_token_ids(tokenizer, row, fmt):
    assert F.detect(row) == fmt
    assert F.normalise(row).format == fmt
    assert D.encode(tokenizer, row, 256, 128) == D.encode(tokenizer, STANDARD, 256, 128)
    assert D.encode(tokenizer, row, 256, 128, fmt) == D.encode(tokenizer, STANDARD, 256, 128)  # forced: same


def test_hh_multi_turn_and_shared_response_words():
    row = {
        "chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: And 2 + 3?\n\nAssistant: I think it is 5.",
        "rejected": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: And 2 + 3?\n\nAssistant: I think it is 6.",
    }
    conv = F.normalise(row)
    assert conv.prompt == [user("Hi."), assistant("Hello."), user("And 2 + 3?")]
    assert conv.chosen == [assistant("I think it is 5.")] and conv.rejected == [assistant("I think it is 6.")]
    plain = F.normalise({"chosen": "Say a digit: 5", "rejected": "Say a digit: 6"})  # no turn markers
    assert plain.prompt == [user("Say a digit:")] and plain.chosen == [assistant("5")]


def test_sft_rows_train_the_last_assistant_turn(tokenizer):
    conv = F.normalise(ULTRACHAT)
    assert conv.format == "sft_messages" and conv.rejected is None
    assert conv.prompt == ULTRACHAT["messages"][:3] and conv.chosen == [assistant(A)]
    p, c, r = D.encode(tokenizer, ULTRACHAT, 256, 128)
    assert c == r and tokenizer.decode(c) == f"{A}<end_of_turn>\n"
    assert tokenizer.decode(p).endswith(f"user\n{Q}<end_of_turn>\n<start_of_turn>model\n")
    strings = {"prompt": Q, "completion": A}
    lists = {"prompt": [user(Q)], "completion": [assistant(A)]}
    want = D.encode(tokenizer, strings, 256, 128)
    assert F.detect(strings) == F.detect(lists) == "sft_prompt_completion"
    assert D.encode(tokenizer, lists, 256, 128) == want and want[1] == D.encode(tokenizer, STANDARD, 256, 128)[1]
    p, c, r = D.encode(tokenizer, {"text": f"{Q} {A}"}, 256, 128)
    assert F.detect({"text": "x"}) == "sft_text" and c == r and len(p) == 1
    assert tokenizer.decode(p + c) == f"<bos>{Q} {A}<eos>"


def test_forced_format_is_strict(tokenizer):
    with pytest.raises(F.BadRow, match=r"wrong_format: data.format=standard expects prompt, chosen, rejected as str"):
        F.normalise(ULTRAFEEDBACK, "standard")
    assert F.normalise(ULTRAFEEDBACK, "sft_messages").format == "sft_messages"  # its messages column
    pairs, bad = D.build_pairs([STANDARD, ULTRAFEEDBACK], tokenizer, 256, 128, "drop", "t", fmt="standard")
    assert [p.example_id for p in pairs] == [0] and bad == {"wrong_format": [1]}
    with pytest.raises(F.BadRow, match="malformed_messages"):  # a response that is not the assistant's
        F.normalise({"prompt": [user(Q)], "chosen": [user(A)], "rejected": [assistant(B)]})


def test_a_row_the_chat_template_refuses_is_dropped_and_counted(tokenizer):
    strict = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + strict
    )
    try:
        system = {
            "prompt": [{"role": "system", "content": "Be brief."}, user(Q)],
            "chosen": [assistant(A)],
            "rejected": [assistant(B)],
        }
        pairs, bad = D.build_pairs([STANDARD, system], tokenizer, 256, 128, "drop", "t")
    finally:
        tokenizer.chat_template = strict
    assert [p.example_id for p in pairs] == [0] and bad == {"chat_template": [1]}
