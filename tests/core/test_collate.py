"""The collator: left padding, answer-only labels, prompt-side truncation."""

import json

import torch
from test_fit import toy_config, write_config

from clbench.cli import main
from clbench.data.collate import IGNORE_INDEX, LeftPadCollator, TokenizedTask, cut_answers, truncate_prompt
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


def test_an_answer_that_fills_the_context_is_cut_and_counted(tiny_model_dir):
    """An answer that alone fills max_prompt_tokens + max_answer_tokens would leave its prompt no room
    (and pass a learned-position model's context): it keeps its first max_answer_tokens; shorter long
    answers still take the prompt's room, whole."""
    tok = load_tokenizer(str(tiny_model_dir))
    task = Task(name="t", train=[], test=[], max_prompt_tokens=8, max_answer_tokens=4, source="data/t")
    huge, long = " ".join(["cat"] * 40), "tac tac"
    task.train = [
        Example("Reverse cat:", huge),
        Example("Reverse cat:", long),
        Example("Reverse cat:", "tac"),
    ]
    data = TokenizedTask(task.train, task, tok, "raw", with_answer=True)
    assert data[0]["answer_ids"] == tok(huge, add_special_tokens=False)["input_ids"][:4]  # cut, no EOS
    assert len(data[0]["prompt_ids"]) + len(data[0]["answer_ids"]) <= 12
    whole = tok(long, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert 4 < len(whole) < 12 and data[1]["answer_ids"] == whole  # over its budget, still whole
    assert cut_answers([task], tok) == [
        "stream.tasks[t] (data/t): 1 of 3 train answers are at least max_prompt_tokens + max_answer_tokens "
        "= 12 tokens long, which leaves their prompt no room in the model's context: training sees their "
        "first max_answer_tokens (4) tokens, without EOS"
    ]


def test_a_learned_position_model_trains_on_answers_longer_than_its_context(
    trace_dir, tiny_model_dir, tmp_path, capsys
):
    """GPT-2's position table ends at its context: an answer longer than it used to end the run with an
    IndexError; now the run completes and says how many answers were cut."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = tmp_path / "gpt2"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(model)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(model)
    rows = json.loads((trace_dir / "parity" / "train.json").read_text())
    rows[0]["answer"] = " ".join(["yes no"] * 80)
    (trace_dir / "parity" / "train.json").write_text(json.dumps(rows))
    cfg = toy_config(trace_dir, model, tmp_path / "runs")
    cfg["stream"]["tasks"] = [{**cfg["stream"]["tasks"][0], "epochs": 1}]
    assert main(["fit", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    assert "1 of 24 train answers are at least" in capsys.readouterr().out
    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert results["status"] == "complete"
