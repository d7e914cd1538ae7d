"""A kit for testing strategies fast and offline: a tiny random Llama and tokenizers, toy TRACE
folders, the runner's services, a context builder and one task's fit as the runner runs it.

clbench's own tests and tools use it, and so can a plugin's (docs/plugins.md):

    module = CLModule(model=str(save_tiny_model(tmp_path / "model", corpus)), lr=1e-2)
    ctx = make_context(module, stream, 0, tmp_path)
    fit_task(module, MyStrategy(), ctx, steps=3)

Everything here is random and tiny (2 layers, 32 wide): seconds on one CPU thread, no download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clbench.strategy import CLStrategy, StrategyContext, TrainingSettings

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from clbench.data.tasks import Example, Task, TaskStream
    from clbench.module import CLModule

# the tiny model's size: fields every Llama-like config (Llama, Mistral, Qwen2) takes
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer (any text encodes; ~320 tokens learnt from `corpus`) with
    BOS/EOS/PAD ids 1/2/0 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over `words` (after <pad>, <unk>, <eos>): every token is a
    whole word, so a test can read which task a batch row came from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<eos>", *dict.fromkeys(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tiny_llama(vocab_size: int, seed: int = 0, tied: bool = False, **overrides) -> torch.nn.Module:
    """A random LlamaForCausalLM, 2 layers, 32 wide, 4 heads (2 key-value), 256 positions; any
    LlamaConfig field can be overridden (hidden_size=64, token ids, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        **TINY,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))


def save_tiny_model(folder: Path, corpus: list[str], **overrides) -> Path:
    """A tiny Llama and a tokenizer learnt from `corpus`, saved as a hub model is: `folder` can be
    given as model.model. `overrides` are LlamaConfig fields: a real model's shape with random
    weights (tools/shapes.py), whose `vocab_size` may exceed the tokenizer's, as real models pad it."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(corpus)
    tok.save_pretrained(folder)
    vocab_size = overrides.pop("vocab_size", len(tok))
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tok)}")
    tiny_llama(vocab_size, **overrides).save_pretrained(folder)
    return folder


def toy_tasks(n_train: int = 24, n_test: int = 8, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Three tiny tasks (parity, reverse, upper) with different answer formats, so they interfere
    like real ones: {task: {"train" | "eval" | "test": [{"prompt", "answer"}]}}."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "map", "red", "tea", "pen", "box", "owl", "fig"]

    def parity(_):
        a = rng.randrange(100)
        return {"prompt": f"Is {a} even? Answer:", "answer": "yes" if a % 2 == 0 else "no"}

    def reverse(_):
        w = rng.choice(words)
        return {"prompt": f"Reverse {w}:", "answer": w[::-1]}

    def upper(_):
        w = rng.choice(words)
        return {"prompt": f"Upper {w}:", "answer": w.upper()}

    out = {}
    for name, make in (("parity", parity), ("reverse", reverse), ("upper", upper)):
        out[name] = {
            "train": [make(i) for i in range(n_train)],
            "eval": [make(i) for i in range(4)],
            "test": [make(i) for i in range(n_test)],
        }
    return out


def write_trace_folder(root: Path, tasks: dict[str, dict[str, list[dict]]]) -> Path:
    """Tasks as a TRACE folder (root/<task>/<split>.json), for stream.data_root."""
    for name, splits in tasks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            (root / name / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


GENERAL_LOADER = """import json
from pathlib import Path

import datasets


def load(**kwargs):
    here = Path(__file__).parent / "toy_general"
    read = lambda split: [json.loads(x) for x in (here / f"{split}.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({s: datasets.Dataset.from_list(read(s)) for s in ("train", "test")})
"""

GENERAL_TASKS = {
    "toy_sum": """task: toy_sum
custom_dataset: !function toy_general.load
output_type: generate_until
fewshot_split: train
test_split: test
num_fewshot: 2
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n", "Question:"], do_sample: false, max_gen_toks: 6}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
filter_list:
  - name: number
    filter: [{function: regex, group_select: -1, regex_pattern: "(-?[0-9]+)"}, {function: take_first}]
metadata: {version: 1.0}
""",
    "toy_choice": """task: toy_choice
custom_dataset: !function toy_general.load
output_type: multiple_choice
fewshot_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
""",
}


def write_general_tasks(folder: Path, n_test: int = 12, seed: int = 0) -> list[str]:
    """Two tiny lm-eval local tasks, as data/general ships them (a YAML each, data read by a
    loader beside them): toy_sum (generate a number, exact match) and toy_choice (4-way multiple
    choice by log-likelihood). Returns the YAML paths, as general.tasks takes them."""
    rng = random.Random(seed)
    data = folder / "toy_general"
    data.mkdir(parents=True, exist_ok=True)
    (folder / "toy_general.py").write_text(GENERAL_LOADER, encoding="utf-8")
    for split, n in (("train", 4), ("test", n_test)):
        rows = []
        for _ in range(n):
            a, b = rng.randrange(1, 20), rng.randrange(1, 20)
            choices = [str(a + b), str(a + b + 1), str(a * b), str(a)]
            rows.append(
                {"question": f"What is {a} plus {b}?", "answer": str(a + b), "choices": choices, "label": 0}
            )
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths = []
    for name, text in GENERAL_TASKS.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
        paths.append(str(folder / f"{name}.yaml"))
    return paths


def quiet_trainer(steps: int, accumulate: int = 1, clip: float | None = None) -> pl.Trainer:
    """A CPU Lightning Trainer for a few steps, with no logger, checkpoint or progress bar."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


class ToyServices:
    """The runner's services (clbench.strategy.Services) in one process: raw prompts, left padding,
    `batch_size` rows, greedy prediction through the module; `predict` and `side_fit` can be
    replaced by a test's own."""

    def __init__(
        self, module: CLModule, stream: TaskStream, t: int, batch_size: int = 4, predict=None, side_fit=None
    ) -> None:
        self.module, self.stream, self.t, self.batch_size = module, stream, t, batch_size
        self._predict, self._side_fit = predict, side_fit

    def _loader(self, examples: list[Example], task: Task | None, answers: bool, shuffle: bool) -> DataLoader:
        from torch.utils.data import DataLoader

        from clbench.data.collate import LeftPadCollator, TokenizedTask

        task = task or self.stream.tasks[self.t]
        data = TokenizedTask(examples, task, self.module.tokenizer, "raw", with_answer=answers)
        collate = LeftPadCollator(self.module.tokenizer.pad_token_id)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def make_loader(self, examples: list[Example], shuffle: bool, task: Task | None = None) -> DataLoader:
        return self._loader(examples, task, True, shuffle)

    def make_prompt_loader(self, examples: list[Example], task: Task | None = None) -> DataLoader:
        return self._loader(examples, task, False, False)

    def predict(self, task: Task, examples: list[Example]) -> list[str]:
        if self._predict is not None:
            return self._predict(task, examples)
        from clbench.evaluation.evaluator import postprocess

        batches = self.make_prompt_loader(examples, task)
        return [postprocess(x, task.postprocess) for b in batches for x in self.module.generate(b)]

    def side_fit(self, task: Task, examples: list[Example]) -> None:
        if self._side_fit is None:
            raise AssertionError("this test gives no side fit")
        self._side_fit(task, examples)

    def training_settings(self, task: Task) -> TrainingSettings:
        m = self.module
        return TrainingSettings(
            m.lr,
            m.weight_decay,
            tuple(m.betas),
            m.warmup_steps,
            m.schedule,
            task.epochs,
            task.max_steps,
            self.batch_size,
            1,
            1,
            self.batch_size,
            "32-true",
            None,
        )

    def frozen_copy(self) -> torch.nn.Module:
        return self.module.frozen_copy()

    def generate_text(self, prompts, max_new_tokens, model=None, temperature=0.0, seed=0, ended=False):
        return self.module.generate_text(
            prompts, max_new_tokens, model, self.batch_size, temperature, seed, ended
        )


def make_context(
    module: CLModule, stream: TaskStream, t: int, run_dir: Path, batch_size: int = 4, seed: int = 0
) -> StrategyContext:
    """Task t's context, with ToyServices batching like training (the task's limits, raw prompts)."""
    services = ToyServices(module, stream, t, batch_size)
    return StrategyContext(module, stream, task_index=t, run_dir=run_dir, seed=seed, services=services)


def fit_task(module: CLModule, strategy: CLStrategy, ctx: StrategyContext, steps: int = 3) -> None:
    """What the runner does for one task: start hook, training examples, a short fit, end hook."""
    module.attach(strategy, ctx)
    strategy.on_task_start(ctx)
    loader = ctx.services.make_loader(strategy.training_examples(ctx, ctx.task.train), True)
    quiet_trainer(steps).fit(module, train_dataloaders=loader)
    strategy.on_task_end(ctx)
