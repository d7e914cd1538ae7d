"""The collator: left padding, answer-only labels, prompt-side truncation."""

import torch

from clbench.data.collate import IGNORE_INDEX, LeftPadCollator, TokenizedTask, truncate_prompt
from clbench.data.tasks import Example, Task
from clbench.models import load_tokenizer


def _task(**kw) -> Task:
    return Task(name="t", train=[], test=[], **kw)


def test_left_padding_and_masks(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    examples = [Example("Reverse cat:", "tac"), Example("Is 12 even? Answer:", "yes")]
    data = TokenizedTask(examples, _task(), tok, "raw", with_answer=True)
    batch = LeftPadCollator(tok.pad_token_id)([data[0], data[1]])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for row, item in enumerate(data.items):
        n = len(item["prompt_ids"]) + len(item["answer_ids"])
        pad = ids.shape[1] - n
        assert mask[row, :pad].sum() == 0 and mask[row, pad:].all()  # padding on the left
        assert (ids[row, :pad] == tok.pad_token_id).all()
        assert (labels[row, : pad + len(item["prompt_ids"])] == IGNORE_INDEX).all()  # prompt, pad masked
        answer = labels[row, pad + len(item["prompt_ids"]) :].tolist()
        assert answer == item["answer_ids"] and answer[-1] == tok.eos_token_id  # answer + EOS learned
    decoded = tok.decode([t for t in labels[0].tolist() if t != IGNORE_INDEX], skip_special_tokens=True)
    assert decoded == "tac"


def test_truncation_cuts_prompt_never_answer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    long_prompt = "Reverse " + " ".join(["dog"] * 60) + " cat:"
    data = TokenizedTask(
        [Example(long_prompt, "tac tac")],
        _task(max_prompt_tokens=10, max_answer_tokens=2),
        tok,
        "raw",
        with_answer=True,
    )
    item = data[0]
    full_answer = tok("tac tac", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["answer_ids"] == full_answer  # the answer is longer than its budget and still whole
    assert len(item["prompt_ids"]) <= 10
    # the end of the prompt (the question) survives the cut
    assert tok.decode(item["prompt_ids"]).endswith("cat:")


def test_truncate_prompt_keeps_bos_and_tail():
    assert truncate_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert truncate_prompt([5, 6, 7, 8], 2, bos_id=1) == [7, 8]
    assert truncate_prompt([5, 6], 4, bos_id=1) == [5, 6]


def test_chat_format_uses_template(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    data = TokenizedTask([Example("Upper cat:", "CAT")], _task(), tok, "chat", with_answer=False)
    text = tok.decode(data[0]["prompt_ids"])
    assert text.startswith("<|user|>Upper cat:") and text.endswith("<|assistant|>")
    assert data[0]["answer_ids"] == []
    batch = LeftPadCollator(tok.pad_token_id)([data[0]])
    assert torch.equal(batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX))
