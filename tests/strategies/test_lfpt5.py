"""LFPT5: one soft prompt on a frozen model; the pseudo examples later tasks train on are what the prompted
model writes after each earlier task's generation prefix; the penalty is gen_lambda x the generation
loss + kl_lambda x the KL to the previous model on pseudo rows, as computed here by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_ssr import recording

from clbench.data.collate import IGNORE_INDEX
from clbench.data.tasks import Example, TaskStream
from clbench.distributed import fsdp_root
from clbench.errors import ConfigError
from clbench.models import LoRA
from clbench.module import CLModule
from clbench.testing import tiny_llama, word_tokenizer
from strategies.lfpt5 import (
    ANSWER,
    GENERATE,
    LFPT5,
    PROMPT,
    generation_prefix,
    generation_target,
    parse,
    row_key,
    target_ids,
)


@pytest.fixture
def make_module(tmp_path):
    """make_module(stream): a random tiny Llama whose word-level vocabulary is the stream's words and
    the two markers, so that a random model now and then writes a parseable example (a byte-level model
    almost never writes a marker, and the shared word-level model has none)."""

    def make(stream: TaskStream, **kwargs) -> CLModule:
        folder = tmp_path / "model"
        if not folder.is_dir():
            texts = [f"{ex.prompt} {ex.answer}" for task in stream.tasks for ex in task.train]
            tok = word_tokenizer([*" ".join(texts).split(), GENERATE, ANSWER])
            lm = tiny_llama(len(tok), tied=True, max_position_embeddings=64, bos_token_id=None)
            lm.save_pretrained(folder)
            tok.save_pretrained(folder)
        torch.manual_seed(0)
        return CLModule(model=str(folder), **{"lr": 1e-2, **kwargs})

    return make


def prepared(module, stream, make_ctx, **options) -> LFPT5:
    strategy = LFPT5(**{"prompt_length": 4, "pseudo_per_task": 8, **options})
    strategy.prepare_model(make_ctx(module, stream, 0))
    strategy.setup(make_ctx(module, stream, 0))
    return strategy


def prompt(module) -> torch.nn.Parameter:
    return fsdp_root(module.model).clbench_soft_prompts.prompts[PROMPT]


def backbone(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "soft_prompts" not in n}


def scripted(ctx, write) -> list[tuple]:
    """Replace the model's writing with `write(prefix, seed)` -> texts, each a continuation that
    ended (EOS) or (text, whether it ended); the calls are returned."""
    calls = []

    def generate_text(prompts, max_new_tokens, model=None, temperature=0.0, seed=0, ended=False):
        calls.append((list(prompts), max_new_tokens, model, temperature, seed))
        rows = [(x, True) if isinstance(x, str) else x for x in write(prompts[0], seed)[: len(prompts)]]
        texts = [text for text, _ in rows]
        return (texts, [end for _, end in rows]) if ended else texts

    ctx.services.generate_text = generate_text
    return calls


def test_only_the_prompt_trains_and_the_backbone_stays_bit_identical(
    make_module, make_ctx, stream_of, fit_task
):
    stream = stream_of(8, 8)
    module = make_module(stream)
    strategy = prepared(module, stream, make_ctx)
    assert module.prompt_names() == [PROMPT]
    table = module.model.get_input_embeddings().weight
    assert prompt(module).shape == (4, table.shape[1])
    assert all((table == row).all(-1).any() for row in prompt(module).detach())  # vocabulary rows
    soft = fsdp_root(module.model).clbench_soft_prompts
    assert soft.active == [] and soft.select is None  # the starting model is evaluated as it is
    weights = backbone(module)
    for t in range(2):
        start = prompt(module).detach().clone()
        fit_task(module, strategy, make_ctx(module, stream, t), steps=3)
        assert list(module.trainable_parameters()) == [f"clbench_soft_prompts.prompts.{PROMPT}"]
        assert not torch.equal(prompt(module).detach(), start)  # the prompt moved
        assert all(torch.equal(p, weights[n]) for n, p in backbone(module).items())  # bit-identical
    again = LFPT5(prompt_length=4)
    again.prepare_model(make_ctx(module, stream, 0))  # as a resumed run's strategy meets its model
    assert module.prompt_names() == [PROMPT]


def test_pseudo_examples_are_what_the_prompted_model_writes(make_module, make_ctx, stream_of, fit_task):
    stream = stream_of(8, 8)
    module = make_module(stream)
    strategy = prepared(module, stream, make_ctx, pseudo_per_task=24, temperature=1.0)
    ctx = make_ctx(module, stream, 0)
    calls = recording(ctx)
    fit_task(module, strategy, ctx, steps=3)

    (prompts, max_new_tokens, model, temperature, seed), *more = calls
    assert not more and prompts == [generation_prefix("alpha")] * 24 and prompts[0] == "__gen__ alpha\n"
    assert model is None and temperature == 1.0 and seed == 0  # the model being trained, its prompt in front
    tok = module.tokenizer
    longest = max(len(tok(generation_target(ex))["input_ids"]) + 1 for ex in ctx.task.train)  # + EOS
    assert max_new_tokens == longest == strategy.budget["alpha"] == 6
    # the same prompt and seed, asked here: the continuations the strategy parsed, those that ended
    texts, ends = module.generate_text(prompts, max_new_tokens, None, 4, temperature, seed, ended=True)
    assert texts == module.generate_text(prompts, max_new_tokens, None, 4, temperature, seed)
    finished = [x for x, end in zip(texts, ends, strict=True) if end or GENERATE in x]
    parsed = [parse(x) for x in finished]
    kept = [(0, ex) for ex in parsed if ex is not None]
    assert strategy.pseudo == kept and 0 < len(kept) < 24
    unfinished = 24 - len(finished)
    assert unfinished > 0 and any(parse(x) for x, end in zip(texts, ends) if not end)  # cut ones parse too
    assert strategy.used() == {
        "alpha": {
            "alpha": {
                "written": 24,
                "unfinished": unfinished,
                "unparsed": parsed.count(None),
                "invalid_label": 0,
                "kept": len(kept),
            }
        }
    }
    with torch.no_grad():  # other prompt weights, other writing
        prompt(module).add_(torch.randn(prompt(module).shape, generator=torch.Generator().manual_seed(1)))
    assert module.generate_text(prompts, max_new_tokens, None, 4, temperature, seed) != texts
    module.set_prompts([])
    assert module.generate_text(prompts, max_new_tokens, None, 4, temperature, seed) != texts


def test_parse_needs_one_answer_marker_and_both_parts():
    assert parse("red green __ans__ five") == Example("red green", "five")
    assert parse(generation_target(Example("a b", "c"))) == Example("a b", "c")
    assert parse("red __ans__ five __gen__ beta dog __ans__ six") == Example("red", "five")  # cut
    for text in ("red five", "red __ans__ five __ans__ six", " __ans__ five", "red __ans__ ", "__gen__ a"):
        assert parse(text) is None, text
    assert parse("red __ans__  \n __gen__ b") is None  # a blank answer


def test_parse_takes_off_only_the_formats_spaces():
    """A code answer's indentation (and an input's own leading whitespace) is what the model wrote
    of the example: only the marker's separating spaces go, and the break before a second example."""
    for example in (
        Example("def f(x):", "    return x\n"),
        Example("  indented input", "\tanswer"),
        Example("trailing space ", " two spaces"),
    ):
        assert parse(generation_target(example)) == example
    code = Example("complete the loop:", "    for i in range(3):\n        print(i)")
    assert parse(generation_target(code) + "\n__gen__ beta\nx __ans__ y") == code


def test_generation_target_cuts_a_long_input_from_the_left_and_keeps_the_answer_and_eos(
    make_module, stream_of
):
    stream = stream_of(8)
    tok = make_module(stream).tokenizer
    words = lambda ids: tok.convert_ids_to_tokens(ids)  # noqa: E731
    long = Example("alpha red green blue red green blue red", "one")
    task = stream.tasks[0]  # max_prompt_tokens 1024, max_answer_tokens 512
    end = ["__ans__", "one", "<eos>"]
    assert target_ids(tok, long, task, 1024) == tok(generation_target(long))["input_ids"] + [tok.eos_token_id]
    assert words(target_ids(tok, long, task, 6)) == ["green", "blue", "red", *end]  # max_pseudo_tokens
    small = dataclasses.replace(task, max_prompt_tokens=4, max_answer_tokens=1)  # the task's budget: 5
    assert words(target_ids(tok, long, small, 1024)) == ["blue", "red", *end]
    short = dataclasses.replace(task, max_prompt_tokens=3)  # the input's own budget, as a prompt's
    assert words(target_ids(tok, long, short, 1024)) == ["green", "blue", "red", *end]
    # the marker and answer alone fill it: one input token, then their first ids (the text goes on)
    assert words(target_ids(tok, long, task, 2)) == ["red", "__ans__"]


def test_long_input_tasks_train_and_write_whole_examples(make_module, make_ctx, stream_of, fit_task):
    """L_gen's target of a row whose input is too long ends in the answer marker, the answer and EOS
    (the input cut from the left, within the row's own task's limits); each task's continuations get
    its longest target's tokens."""
    base = stream_of(8, 8)
    long = [Example(f"{ex.prompt} red green blue red", ex.answer) for ex in base.tasks[0].train]
    first = dataclasses.replace(base.tasks[0], train=long, max_prompt_tokens=2)
    stream = TaskStream(name=base.name, tasks=[first, base.tasks[1]])
    module = make_module(stream)
    tok = module.tokenizer
    strategy = prepared(module, stream, make_ctx, pseudo_per_task=1, max_pseudo_tokens=6)
    ctx = make_ctx(module, stream, 0)
    calls = scripted(ctx, lambda prefix, seed: ["alpha red green blue red green __ans__ two"])
    fit_task(module, strategy, ctx, steps=1)
    items = [item["answer_ids"] for _, item in strategy._rows.values()]
    assert {tuple(tok.convert_ids_to_tokens(ids[-3:])) for ids in items} == {
        ("__ans__", "one", "<eos>"),
        ("__ans__", "two", "<eos>"),
    }
    assert all(len(ids) == 5 for ids in items)  # 2 words of the input (the task's max_prompt_tokens)
    assert calls[0][1] == strategy.budget["alpha"] == 5

    ctx = make_ctx(module, stream, 1)
    strategy.on_task_start(ctx)
    examples = strategy.training_examples(ctx, ctx.task.train)
    assert examples[-1] == Example("alpha red green blue red green", "two")  # the pseudo row of alpha
    batch = next(iter(ctx.services.make_loader(examples[-1:], False)))
    task, item = strategy._rows[row_key(batch["input_ids"][0])]
    assert task == 0 and item["answer_ids"] == target_ids(tok, examples[-1], first, 6)  # alpha's limits
    assert tok.convert_ids_to_tokens(item["answer_ids"]) == ["red", "green", "__ans__", "two", "<eos>"]


def labelled(stream: TaskStream) -> TaskStream:
    """Every task a classification task whose labels are its answers (as the loaders set them)."""
    tasks = [dataclasses.replace(t, labels=sorted({ex.answer for ex in t.train})) for t in stream.tasks]
    return TaskStream(name=stream.name, tasks=tasks)


def test_what_fails_to_parse_or_names_no_label_is_dropped_and_counted(
    make_module, make_ctx, stream_of, fit_task, tmp_path
):
    stream = labelled(stream_of(8, 8, 8))
    module = make_module(stream)
    strategy = prepared(module, stream, make_ctx, pseudo_per_task=7)
    labels = {t.name: t.labels for t in stream.tasks}  # alpha: one, two; beta: four, three

    def write(prefix: str, seed: int) -> list[str]:
        first, second = labels[prefix.split()[1]]
        return [
            f"alpha red __ans__ {first}",  # kept
            "alpha blue __ans__ dog",  # not a label of the task
            "red green five",  # no answer marker
            f"red __ans__ {first} __ans__ {second}",  # two
            f"__ans__ {second}",  # no input
            # kept, cut at the second example, which ran to the token limit
            (f"green __ans__ {second} __gen__ alpha red __ans__ {first}", False),
            (f"blue __ans__ {first}", False),  # stopped at the token limit: its answer may be cut
        ]

    for t in range(2):
        ctx = make_ctx(module, stream, t)
        scripted(ctx, write)
        fit_task(module, strategy, ctx, steps=1)
    counts = {"written": 7, "unfinished": 1, "unparsed": 3, "invalid_label": 1, "kept": 2}
    assert strategy.used() == {"alpha": {"alpha": counts}, "beta": {"alpha": counts, "beta": counts}}
    assert strategy.pseudo == [
        (0, Example("alpha red", "one")),
        (0, Example("green", "two")),
        (1, Example("alpha red", "four")),
        (1, Example("green", "three")),
    ]
    record = json.loads((tmp_path / "lfpt5" / "pseudo.json").read_text())["after_task"]
    assert {after: doc["counts"] for after, doc in record.items()} == strategy.used()
    assert record["beta"]["examples"] == [
        {"task": stream.names[t], "prompt": ex.prompt, "answer": ex.answer} for t, ex in strategy.pseudo
    ]


def test_pseudo_examples_are_written_anew_before_each_later_task_and_mixed_into_it(
    make_module, make_ctx, stream_of, fit_task
):
    stream = stream_of(8, 8, 8)
    module = make_module(stream)
    strategy = prepared(module, stream, make_ctx, pseudo_per_task=2)
    colours = iter(["red", "green", "blue"])  # one per call: tells the writings apart

    def write(prefix: str, seed: int) -> list[str]:
        name, colour = prefix.split()[1], next(colours)
        return [f"{name} {colour} __ans__ one", f"{colour} __ans__ two"]

    mixed = []
    for t in range(3):
        ctx = make_ctx(module, stream, t)
        calls = scripted(ctx, write)
        before = strategy.pseudo
        mixed.append(strategy.training_examples(ctx, ctx.task.train))
        assert mixed[t] == ctx.task.train + [ex for _, ex in before]
        fit_task(module, strategy, ctx, steps=1)
        # after the last task nothing is written; else one call per finished task, seeded by t and j
        assert [(c[0], c[4]) for c in calls] == [
            ([generation_prefix(stream.names[j])] * 2, t * 1000 + j) for j in range(t + 1) if t < 2
        ]
    assert mixed[0] == stream.tasks[0].train  # the first task trains on its own examples only
    assert [ex.prompt for ex in mixed[1][8:]] == ["alpha red", "red"]
    # before the third task both earlier tasks were written again (nothing of the first writing left)
    assert [(ex.prompt, ex.answer) for ex in mixed[2][8:]] == [
        ("alpha green", "one"),
        ("green", "two"),
        ("beta blue", "one"),
        ("blue", "two"),
    ]
    assert [t for t, _ in strategy.pseudo] == [0, 0, 1, 1]


def by_hand(module, rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Next-token logits of [rows; ids] (one unpadded sequence), the prompt's positions dropped."""
    embeds = torch.cat([rows, module.model.get_input_embeddings()(torch.tensor(ids))])[None]
    with torch.no_grad():
        out = module.model(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None])
    return out.logits[0, len(rows) :].double()


def test_penalty_is_gen_lambda_generation_loss_plus_kl_lambda_kl_on_pseudo_rows(
    make_module, make_ctx, stream_of, fit_task
):
    stream = stream_of(8, 8)
    module = make_module(stream)
    options = {"prompt_length": 3, "pseudo_per_task": 3, "gen_lambda": 0.3, "kl_lambda": 0.7}
    strategy = prepared(module, stream, make_ctx, **options)
    ctx0 = make_ctx(module, stream, 0)
    writing = ["alpha blue __ans__ two", "red red __ans__ one", "green __ans__ two"]
    scripted(ctx0, lambda prefix, seed: writing)
    fit_task(module, strategy, ctx0, steps=2)
    assert strategy._previous is None  # task 0: no previous model

    ctx = make_ctx(module, stream, 1, batch_size=11)  # all 8 examples and the 3 pseudo ones in one batch
    strategy.on_task_start(ctx)
    previous = prompt(module).detach().clone()
    with torch.no_grad():  # the prompt moved since the task began: the KL is not zero
        prompt(module).add_(0.5 * torch.randn(previous.shape, generator=torch.Generator().manual_seed(2)))
    current = prompt(module).detach().clone()
    examples = strategy.training_examples(ctx, ctx.task.train)
    batch = next(iter(ctx.services.make_loader(examples, False)))  # row i is examples[i]
    module.train()
    with torch.enable_grad():
        penalty = strategy.training_penalty(ctx, batch, module(batch))
    penalty.backward()  # the gradient reaches the prompt only
    assert prompt(module).grad.abs().sum() > 0
    assert all(p.grad is None for n, p in module.model.named_parameters() if "soft_prompts" not in n)

    module.set_prompts([])  # the prompts put in front by hand below
    tok = module.tokenizer
    gen_sum = gen_count = kl_sum = 0.0
    for i, (ex, ids, mask, labels) in enumerate(
        zip(examples, batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
    ):
        t = 1 if i < 8 else 0  # the task's own examples, then the pseudo ones of task 0
        prefix = tok(f"__gen__ {stream.names[t]}\n")["input_ids"]
        target = tok(f"{ex.prompt} __ans__ {ex.answer}", add_special_tokens=False)["input_ids"]
        target += [tok.eos_token_id]
        logp = F.log_softmax(by_hand(module, current, prefix + target)[len(prefix) - 1 : -1], -1)
        gen_sum += -logp[torch.arange(len(target)), torch.tensor(target)].sum().item()
        gen_count += len(target)
        if t == 0:  # KL(previous || current) at the positions that predict the answer and EOS
            ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()]
            at = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
            old = F.log_softmax(by_hand(module, previous, ids)[at], -1)
            new = F.log_softmax(by_hand(module, current, ids)[at], -1)
            kl_sum += (old.exp() * (old - new)).sum().item()
    assert [ex.prompt for ex in examples[8:]] == ["alpha blue", "red red", "green"] and kl_sum > 1e-4
    expected = 0.3 * gen_sum / gen_count + 0.7 * kl_sum / len(examples)
    assert penalty.item() == pytest.approx(expected, rel=1e-5)


def test_state_round_trip_continues_identically(make_module, make_ctx, stream_of, fit_task, tmp_path):
    stream = stream_of(8, 8, 8)
    module = make_module(stream)
    options = {"pseudo_per_task": 16, "temperature": 1.0}
    original = prepared(module, stream, make_ctx, **options)
    for t in range(2):
        fit_task(module, original, make_ctx(module, stream, t), steps=2)
    assert original.pseudo and {t for t, _ in original.pseudo} <= {0, 1}
    save_file(original.state_dict(), str(tmp_path / "state.safetensors"))
    restored = prepared(module, stream, make_ctx, **options)  # as a resumed run: structure, setup, state
    restored.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert restored.used() == original.used() and restored.budget == original.budget
    assert restored.pseudo == original.pseudo

    def behaviour(strategy) -> tuple:
        ctx = make_ctx(module, stream, 2)
        strategy.on_task_start(ctx)
        examples = strategy.training_examples(ctx, ctx.task.train)
        batch = next(iter(ctx.services.make_loader(examples, False)))
        return examples, strategy.training_penalty(ctx, batch, module(batch)).item()

    assert behaviour(restored) == behaviour(original)


def test_lora_is_refused_in_one_line(make_module, make_ctx, stream_of):
    stream = stream_of(8, 8)
    module = make_module(stream, lora=LoRA(r=4, dropout=0.0))
    with pytest.raises(ConfigError, match="unset model.lora"):
        LFPT5().prepare_model(make_ctx(module, stream, 0))


@pytest.mark.parametrize(
    "options, option",
    [
        ({"prompt_length": 0}, "prompt_length"),
        ({"pseudo_per_task": 0}, "pseudo_per_task"),
        ({"max_pseudo_tokens": 0}, "max_pseudo_tokens"),
        ({"gen_lambda": -0.1}, "gen_lambda"),
        ({"kl_lambda": -0.1}, "kl_lambda"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_options_are_checked(options, option):
    with pytest.raises(ValueError, match=f"lfpt5.{option}"):
        LFPT5(**options)
