"""LFPT5: one soft prompt that both solves the tasks and writes examples of them; later tasks train on
the examples it writes of the earlier ones, kept consistent with the previous model's answers.

Qin & Joty 2022, "LFPT5: A Unified Framework for Lifelong Few-shot Language Learning Based on Prompt
Tuning of T5" (ICLR 2022, arXiv 2110.07298), and the authors' code (qcwthu/Lifelong-Fewshot-Language-
Learning, Classification/: its model.py, dataset.py and the defaults of Classification.sh). The
language model stays frozen; one prompt P of `prompt_length` virtual tokens trains from task to task
(the authors' script: 300 tokens on LM-adapted T5-large, Adafactor at lr 0.5). Every training row
(x, y) of task k trains

    L_task + gen_lambda * L_gen + kl_lambda * L_kl

- L_task: the runner's loss, the answer tokens of [P; x; y EOS] (mean over the batch's answer tokens).
- L_gen: the model as a data generator. After the generation prefix of the row's own task,
  GENERATE and the task's name, it learns to write the whole example: [P; "__gen__ <task>\\n";
  x " __ans__ " y EOS], the loss on x, the answer marker, y and EOS (mean over those tokens of the
  batch). The paper's encoder reads the task's generation token and its decoder writes x __ans__ y.
- L_kl: label consistency, on the rows that are pseudo examples of earlier tasks only:
  KL(p_prev || p) of the next-token distributions at their answer tokens, where p_prev is the model
  with P as it was when task k began (the previous model), summed over those tokens and divided by
  the batch's rows.

Before task k > 0 (at the end of task k-1, so a resume finds them in the state), the model as it is
then (the current prompt) writes `pseudo_per_task` continuations of each earlier task j's generation
prefix (j = 0..k-1), sampled at `temperature` from a generator seeded by the run's seed, k-1 and j.
A continuation must have ended its example, with EOS or by starting a second example (GENERATE),
before the token limit (one that stopped there has its answer cut short and would train as whole,
EOS after it: it is dropped, `unfinished`; Services.generate_text(ended=True) tells which). It is
cut where it starts a second example and must split at exactly one ANSWER into an input and an
answer, neither blank (only the spaces the format puts around the marker are taken off: a code
answer keeps its indentation); for a classification task (Task.labels) the answer must be one of its
labels (the authors' code keeps only pseudo examples with a valid label). What fails is dropped and
counted. Task k trains on its own examples plus every kept pseudo example, shuffled together (pseudo
rows in the format and limits of task k's prompts, as replay's and SSR's examples); they are written
anew before every task, never accumulated, and no example of an earlier task is read after it
finished (its longest generation target, in tokens, is kept from its end as the budget of its
continuations). Pseudo rows train L_task and L_gen too (each after its own task's prefix), so the
prompt goes on being able to write them, as in the paper and the authors' code.

The decoder reading, and where it departs from the paper or the authors' code:

- The generation token is text (GENERATE, the task's name) where the authors add one new vocabulary
  token per task: the backbone is frozen, so a new token's embedding would never train (T5's spare
  rows in their code stay at their initial values too). The answer marker is text as theirs.
- The prompt goes in front of every input (clbench.prompts); their T5 encoder reads it after the
  input, which a bidirectional encoder allows and a causal model does not.
- The weights: the authors' code trains (1 - kd) * (L_task + lm * L_gen) + kd * L_kd, lm 0.25,
  kd 0.01. Adam's step does not change when the whole loss is scaled (but for its epsilon and for
  gradient clipping), so this is kl_lambda = kd / (1 - kd) = 0.0101 here; the default 0.01 is theirs.
  Their L_kd sums the KL over every decoder position of the pseudo rows of a micro-batch of two
  (padding positions included); here it is summed over the pseudo rows' answer tokens (EOS included)
  and divided by the batch's rows, so it does not grow with the batch size. L_gen is averaged over
  its tokens, as T5's loss averages it there.
- Sampling: the authors sample with top-k 64 and a repetition penalty of 2.5; Services.generate_text
  samples from the whole distribution, so a temperature below 1 (default 0.7, not from the paper)
  stands in for the cut tail. They keep two pseudo examples per class of each earlier task and hold
  as many out as pseudo validation data; clbench's training has no validation split, and its tasks
  are mostly not classification, so here every parsed example trains and `pseudo_per_task` fixes how
  many are written (not a share of the new task's data).
- The prompt starts as the embeddings of random vocabulary tokens (Lester et al., as Progressive
  Prompts); the authors' code starts it from frequent tokens and the task's label words.
- The paper adds new prompt embeddings for a new task type (the earlier ones frozen); a clbench
  stream names no task types, so one prompt serves every task, as TRACE's code has it.

TRACE's code (BeyonderXX/TRACE, model/Replay/LFPT5.py at 66a48b9, its training/main.py) differs
more: one 300-token prompt (peft prompt tuning) trained on the task loss alone, no generation loss
and no KL; its "pseudo data" are the earlier tasks' TEST prompts, answered by the current model
(sampled at temperature 0.1). The model never writes an input there, and test inputs enter training.
Here the model writes inputs and answers, as the paper defines the method.

Costs. Every step runs a second forward and backward (the generation sequences: prefix, input and
answer, about the task sequence's length; their activations are held beside the task's until the
backward), and from the second task on, when pseudo examples were kept, a third forward without
gradient (the previous model on the batch). The previous model needs no copy of the backbone: it is
the same frozen backbone with the prompt as the task began (one prompt-sized tensor), put in front by
the prompt selector (`set_prompts(select=...)`) while that forward runs. After every task but the
last: pseudo_per_task continuations for each finished task, each at most the task's longest
generation target long. A generation target (`target_ids`) has at most min(`max_pseudo_tokens`, the
task's max_prompt_tokens + max_answer_tokens) tokens: a longer input is cut from the left, as the
runner cuts a prompt, and the answer marker, the answer and EOS are kept whole, so the writer learns
to end every example, a long-input task's too.

Several ranks: every rank writes the same continuations (rank 0's are broadcast) and runs both extra
forwards on its rows every step (under FSDP2 every rank joins every forward); L_gen divides by the
global batch's generation tokens / world size and L_kl by its rows / world size, so the ranks'
average gradient is one process's. RUN_DIR/lfpt5/pseudo.json records, for every task end, what was
written of each finished task (written, unfinished, unparsed, invalid_label, kept) and the kept
examples; the state is that record and the budgets, as the UTF-8 bytes of one JSON document. Prompt
tuning wants a large learning rate (model.lr; the authors 0.5). LoRA is refused (the model is
frozen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clbench import distributed as dist
from clbench.data.collate import IGNORE_INDEX, LeftPadCollator, answer_ids, format_prompt, truncate_prompt
from clbench.data.tasks import Example, Task
from clbench.errors import ConfigError
from clbench.files import write_json
from clbench.prompts import SoftPrompts, refuse_adapters
from clbench.strategy import (
    CLStrategy,
    StrategyContext,
    examples_json,
    json_examples,
    json_tensor,
    tensor_json,
)
from strategies.lwf import answer_logits, distillation_kl

PROMPT = "lfpt5"  # the soft prompt's name (a model parameter)
GENERATE, ANSWER = "__gen__", "__ans__"


def generation_prefix(task_name: str) -> str:
    """What the model is given to write an example of a task: the generation marker and its name."""
    return f"{GENERATE} {task_name}\n"


def generation_target(example: Example) -> str:
    """What it learns to write after the prefix (EOS follows): input, answer marker, answer."""
    return f"{example.prompt} {ANSWER} {example.answer}"


def target_ids(tokenizer, example: Example, task: Task, max_tokens: int) -> list[int]:
    """The ids of `generation_target(example)` and EOS, as L_gen trains them: the input's ids, cut
    from the LEFT as the runner cuts a prompt (`truncate_prompt`: the end holds the question; at most
    the task's max_prompt_tokens), then those of " __ans__ " + answer and EOS, kept whole; in all at
    most min(max_tokens, the task's max_prompt_tokens + max_answer_tokens). Only where the marker and
    answer alone fill that does the target keep one input token and the marker and answer's first
    ids, without EOS (the text goes on, as the runner's `fitted_answer`)."""
    cap = min(max_tokens, task.max_prompt_tokens + task.max_answer_tokens)
    tail = answer_ids(tokenizer, f" {ANSWER} {example.answer}")
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    prompt = truncate_prompt(prompt, min(task.max_prompt_tokens, cap - len(tail)), None)
    return (prompt + tail)[:cap]


def parse(text: str) -> Example | None:
    """The example a continuation writes: the text before any second example, split at exactly one
    answer marker into an input and an answer that are not blank; None when it does not.

    Only what the format adds is taken off: the space on either side of the marker (the
    `generation_target` format) and, where a second example follows, the whitespace before it. An
    input's or answer's own leading whitespace (a code line's indentation) stays."""
    body, *more = text.split(GENERATE, 1)
    if more:
        body = body.rstrip()
    if body.count(ANSWER) != 1:
        return None
    prompt, answer = body.split(ANSWER)
    prompt, answer = prompt.removesuffix(" "), answer.removeprefix(" ")
    return Example(prompt, answer) if prompt.strip() and answer.strip() else None


class LFPT5(CLStrategy):
    """One soft prompt on a frozen model that solves the tasks and writes the examples later tasks rehearse.

    Pseudo examples of the earlier tasks, written by the prompted model, train beside each new task,
    with a KL pull to the previous model's answers on them. The module docstring gives the method, its
    decoder reading and where it departs from the paper.

    Args:
        prompt_length: Virtual tokens of the prompt (the authors' script: 300).
        pseudo_per_task: Continuations written of each finished task before the next task; those
            that do not parse are dropped (RUN_DIR/lfpt5/pseudo.json counts them).
        gen_lambda: Weight of the generation loss (the authors' code: 0.25); 0 trains no writer.
        kl_lambda: Weight of the KL between the previous and the current model on pseudo examples
            (the authors' code: 0.01, see the module docstring); 0 leaves it out.
        temperature: Sampling temperature of the continuations (0.7, not from the paper).
        max_pseudo_tokens: Longest generation target, in tokens, trained and written (and at most
            the task's max_prompt_tokens + max_answer_tokens): longer inputs are cut from the left.
    """

    def __init__(
        self,
        prompt_length: int = 300,
        pseudo_per_task: int = 50,
        gen_lambda: float = 0.25,
        kl_lambda: float = 0.01,
        temperature: float = 0.7,
        max_pseudo_tokens: int = 1024,
    ) -> None:
        for option, value in (
            ("prompt_length", prompt_length),
            ("pseudo_per_task", pseudo_per_task),
            ("max_pseudo_tokens", max_pseudo_tokens),
        ):
            if value < 1:
                raise ValueError(f"lfpt5.{option} must be >= 1, got {value}")
        for option, value in (("gen_lambda", gen_lambda), ("kl_lambda", kl_lambda)):
            if value < 0:
                raise ValueError(f"lfpt5.{option} must be >= 0, got {value}")
        if temperature <= 0:
            raise ValueError(f"lfpt5.temperature must be positive (samples differ), got {temperature}")
        self.prompt_length, self.pseudo_per_task = prompt_length, pseudo_per_task
        self.gen_lambda, self.kl_lambda = gen_lambda, kl_lambda
        self.temperature, self.max_pseudo_tokens = temperature, max_pseudo_tokens
        # per task end (but the last): {"counts": {finished task: {...}}, "examples": [[t, prompt, answer]]}
        self.written: dict[str, dict[str, Any]] = {}
        self.budget: dict[str, int] = {}  # per finished task: tokens of its longest generation target
        self._soft: SoftPrompts | None = None  # the model's prompts (read at each call: FSDP2 swaps them)
        self._previous: torch.Tensor | None = None  # P as the task began (the previous model), whole
        self._teacher = False  # the previous model's forward is in flight
        self._rows: dict[bytes, tuple[int, dict]] = {}  # a training row's tokens -> (task, generation item)

    def prepare_model(self, ctx: StrategyContext) -> None:
        refuse_adapters(ctx.module, "lfpt5 trains one soft prompt")
        names = ctx.module.prompt_names()
        if names == [PROMPT]:  # a module another instance prepared (a resume builds it anew)
            return
        if names:
            raise ConfigError(f"lfpt5: the model has other soft prompts already: {names}")
        ctx.module.add_prompt(PROMPT, self.prompt_length, seed=ctx.seed * 100_003)  # vocabulary rows

    def setup(self, ctx: StrategyContext) -> None:
        self._soft = SoftPrompts.of(dist.fsdp_root(ctx.model))
        ctx.module.set_prompts([])  # the starting model is evaluated as it is

    def on_task_start(self, ctx: StrategyContext) -> None:
        ctx.module.freeze_backbone()
        self._previous = None
        if self.kl_lambda > 0 and self.pseudo:  # the same on every rank: under FSDP2 a gather
            self._previous = dist.full(self._soft.prompts[PROMPT]).detach().clone()
        ctx.module.set_prompts([], trainable=[PROMPT], select=self._prompt_rows)

    def _prompt_rows(
        self, ids: torch.Tensor | None, embeds: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The prompt in front of every row: the trained one, or the previous one while the previous
        model's forward runs (called inside the forward, where FSDP2 has the prompt whole)."""
        prompt = self._previous if self._teacher else self._soft.prompts[PROMPT]
        return prompt.to(embeds.device).unsqueeze(0).expand(embeds.shape[0], -1, -1)

    @property
    def pseudo(self) -> list[tuple[int, Example]]:
        """The pseudo examples the next task trains on: those written at the last task end."""
        return json_examples(list(self.written.values())[-1]["examples"]) if self.written else []

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        kept = [(ctx.task_index, ex) for ex in examples] + self.pseudo
        self._rows = self._row_index(ctx, kept)
        return [ex for _, ex in kept]

    def _row_index(self, ctx: StrategyContext, kept: list[tuple[int, Example]]) -> dict:
        """Each training row's tokens (as the runner's loader makes them) -> its task and generation
        sequence; of rows with the same tokens the first is kept (this task's own before pseudo ones)."""
        tok, names = ctx.module.tokenizer, ctx.stream.names
        prefixes = {t: format_prompt(tok, generation_prefix(names[t]), "raw") for t in {t for t, _ in kept}}
        batches = ctx.service().make_loader([ex for _, ex in kept], False)
        rows = (ids[mask.bool()] for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"]))
        index: dict[bytes, tuple[int, dict]] = {}
        for (t, ex), ids in zip(kept, rows, strict=True):
            target = target_ids(tok, ex, ctx.stream.tasks[t], self.max_pseudo_tokens)
            index.setdefault(row_key(ids), (t, {"prompt_ids": prefixes[t], "answer_ids": target}))
        return index

    def training_penalty(
        self, ctx: StrategyContext, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """gen_lambda * L_gen + kl_lambda * L_kl (the module docstring)."""
        rows = []
        for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu()):
            found = self._rows.get(row_key(ids[mask.bool()]))
            if found is None:
                raise RuntimeError("lfpt5: a training row that training_examples did not return")
            rows.append(found)
        penalty = None
        if self.gen_lambda > 0:
            penalty = self.gen_lambda * self._generation_loss(ctx, [item for _, item in rows], batch)
        if self._previous is not None:
            pseudo = torch.tensor([t != ctx.task_index for t, _ in rows], device=batch["input_ids"].device)
            kl = self.kl_lambda * self._consistency(ctx, batch, outputs, pseudo)
            penalty = kl if penalty is None else penalty + kl
        return penalty

    def _generation_loss(self, ctx: StrategyContext, items: list[dict], batch: dict) -> torch.Tensor:
        """The mean token loss of the rows' generation sequences (over the global batch's tokens)."""
        collate = LeftPadCollator(ctx.module.tokenizer.pad_token_id)
        gen = collate([{**it, "max_new_tokens": 0} for it in items])
        gen = {k: gen[k].to(batch["input_ids"].device) for k in ("input_ids", "attention_mask", "labels")}
        share = None
        if ctx.world_size > 1:  # each rank's sum over the global count / world: the rank average is its mean
            count = (gen["labels"][:, 1:] != IGNORE_INDEX).sum().float()
            share = dist.all_reduce_(count) / ctx.world_size
        return ctx.module(gen, share).loss

    def _consistency(
        self, ctx: StrategyContext, batch: dict, outputs: Any, pseudo: torch.Tensor
    ) -> torch.Tensor:
        """KL(previous || current) over the pseudo rows' answer tokens, summed, / the batch's rows.
        The previous model runs on the whole batch on every rank (FSDP2: every rank in every forward)."""
        self._teacher = True
        try:
            with torch.no_grad():
                old = ctx.module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        finally:
            self._teacher = False
        labels = batch["labels"][pseudo]
        new, old = answer_logits(outputs.logits[pseudo], labels), answer_logits(old.logits[pseudo], labels)
        rows = torch.tensor(float(len(pseudo)), device=pseudo.device)
        if ctx.world_size > 1:
            rows = dist.all_reduce_(rows) / ctx.world_size
        return distillation_kl(new, old, 1.0, rows)

    def on_task_end(self, ctx: StrategyContext) -> None:
        """Write pseudo examples of every finished task for the next task (none after the last)."""
        t = ctx.task_index
        if t == len(ctx.stream) - 1:
            return
        tok = ctx.module.tokenizer
        # what L_gen trained it to write: its continuations get as many tokens as its longest target
        self.budget[ctx.task.name] = max(
            len(target_ids(tok, ex, ctx.task, self.max_pseudo_tokens)) for ex in ctx.task.train
        )
        counts, kept = {}, []
        for j, task in enumerate(ctx.stream.tasks[: t + 1]):
            texts, ends = ctx.service().generate_text(
                [generation_prefix(task.name)] * self.pseudo_per_task,
                self.budget[task.name],
                None,  # the model being trained, its prompt in front
                self.temperature,
                (ctx.seed * 1000 + t) * 1000 + j,
                ended=True,
            )
            # the same on every rank already; rank 0's make sure every rank trains on the same examples
            texts, ends = dist.broadcast_object((texts, ends))
            # one that stopped at the token limit before it ended its example (EOS, or a second
            # example begun) has its answer cut short: it would train as whole, EOS after it
            finished = [x for x, end in zip(texts, ends, strict=True) if end or GENERATE in x]
            parsed = [parse(x) for x in finished]
            examples = [ex for ex in parsed if ex is not None and is_label(ex, task)]
            counts[task.name] = {
                "written": len(texts),
                "unfinished": len(texts) - len(finished),
                "unparsed": parsed.count(None),
                "invalid_label": len(parsed) - parsed.count(None) - len(examples),
                "kept": len(examples),
            }
            kept += [(j, ex) for ex in examples]
        self.written[ctx.task.name] = {"counts": counts, "examples": examples_json(kept)}
        if ctx.writes:
            self._write(ctx)

    def _write(self, ctx: StrategyContext) -> None:
        names = ctx.stream.names
        record = {
            after: {
                "counts": doc["counts"],
                "examples": [{"task": names[t], "prompt": p, "answer": a} for t, p, a in doc["examples"]],
            }
            for after, doc in self.written.items()
        }
        path = Path(ctx.run_dir) / "lfpt5" / "pseudo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"after_task": record})

    def used(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per task end, of each finished task: continuations written, unfinished (stopped at the
        token limit), unparsed, with an invalid label, and kept."""
        return {after: doc["counts"] for after, doc in self.written.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"written": json_tensor({"written": self.written, "budget": self.budget})}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        doc = tensor_json(state["written"])
        self.written, self.budget = doc["written"], doc["budget"]


def row_key(ids: torch.Tensor) -> bytes:
    """A training row's real tokens (padding dropped) as a dictionary key."""
    return ids.to(torch.int32).numpy().tobytes()


def is_label(example: Example, task: Task) -> bool:
    """Whether a pseudo example's answer may stand: any answer, or for a classification task a label."""
    return task.labels is None or example.answer in task.labels
