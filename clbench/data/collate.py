"""Tokenisation and batching: left padding, loss on answer + EOS only, prompt-side truncation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from clbench.data.tasks import Example, Task

IGNORE_INDEX = -100


def format_prompt(tokenizer, prompt: str, prompt_format: str) -> list[int]:
    """Prompt token ids: the raw text (TRACE) or the tokenizer's chat template."""
    if prompt_format == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def truncate_prompt(prompt_ids: list[int], budget: int, bos_id: int | None) -> list[int]:
    """Cut a prompt from the left to `budget` tokens (the end holds the question), keeping BOS."""
    budget = max(budget, 1)
    if len(prompt_ids) <= budget:
        return prompt_ids
    if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id:
        return [bos_id] + prompt_ids[len(prompt_ids) - budget + 1 :]
    return prompt_ids[len(prompt_ids) - budget :]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token, as `generate` does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """An answer's token ids as training learns them: its text, then EOS."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def leaves_no_room(n_answer: int, task: Task) -> bool:
    """Whether an answer of `n_answer` ids (EOS included) alone fills the sequence budget,
    max_prompt_tokens + max_answer_tokens (within the model's context: fit_to_context), and so would
    leave its prompt no room."""
    return n_answer >= task.max_prompt_tokens + task.max_answer_tokens


def fitted_answer(answer: list[int], task: Task) -> list[int]:
    """The answer ids a training sequence keeps: all of them, or, when they leave the prompt no room,
    the first max_answer_tokens, without EOS (the text goes on)."""
    return answer[: task.max_answer_tokens] if leaves_no_room(len(answer), task) else answer


class TokenizedTask(Dataset):
    """A task split tokenised once: items are dicts of prompt ids and answer ids (+ EOS).

    The prompt gets at most `max_prompt_tokens`, and less when a long answer would push prompt +
    answer past `max_prompt_tokens + max_answer_tokens`; an answer too long for any prompt to fit
    beside it is cut to `max_answer_tokens` (`fitted_answer`; the run warns: `cut_answers`).
    """

    def __init__(
        self, examples: Sequence[Example], task: Task, tokenizer, prompt_format: str, with_answer: bool
    ):
        self.items = []
        for ex in examples:
            prompt = format_prompt(tokenizer, ex.prompt, prompt_format)
            answer = fitted_answer(answer_ids(tokenizer, ex.answer), task) if with_answer else []
            budget = min(
                task.max_prompt_tokens, task.max_prompt_tokens + task.max_answer_tokens - len(answer)
            )
            self.items.append(
                {
                    "prompt_ids": truncate_prompt(prompt, budget, tokenizer.bos_token_id),
                    "answer_ids": answer,
                    "max_new_tokens": task.max_new_tokens,
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class LeftPadCollator:
    """Left-pads prompt+answer sequences; labels are -100 on prompt and padding.

    Left padding keeps every sequence's last real token at the same position, which is what
    batched generation needs; training uses the same layout so the two agree.
    """

    pad_id: int

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["prompt_ids"] + it["answer_ids"] for it in items]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, (it, seq) in enumerate(zip(items, seqs, strict=True)):
            start = width - len(seq)
            input_ids[row, start:] = torch.tensor(seq)
            attention_mask[row, start:] = 1
            n_ans = len(it["answer_ids"])
            if n_ans:
                labels[row, width - n_ans :] = torch.tensor(it["answer_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch["max_new_tokens"] = max(it["max_new_tokens"] for it in items)
        return batch


def cut_answers(tasks: Sequence[Task], tokenizer) -> list[str]:
    """A warning per task whose training or eval answers (the splits that train or probe the loss
    with their answers) `fitted_answer` cuts, with how many: a researcher sees what the data lost."""
    notes = []
    for task in tasks:
        room = task.max_prompt_tokens + task.max_answer_tokens
        counts = []
        for split, examples in (("train", task.train), ("eval", task.eval)):
            ids = (
                tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
                if examples
                else []
            )
            cut = sum(leaves_no_room(len(a) + 1, task) for a in ids)  # + 1: EOS
            if cut:
                counts.append(f"{cut} of {len(examples)} {split} answers")
        if counts:
            notes.append(
                f"stream.tasks[{task.name}] ({task.source}): {' and '.join(counts)} are at least "
                f"max_prompt_tokens + max_answer_tokens = {room} tokens long, which leaves their prompt no "
                f"room in the model's context: training sees their first max_answer_tokens "
                f"({task.max_answer_tokens}) tokens, without EOS"
            )
    return notes
