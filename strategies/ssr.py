"""Self-synthesized rehearsal (SSR): the starting model writes new inputs for a finished task from a
few of its examples, the trained model answers them, and later tasks rehearse a diverse subset.

Huang et al. 2024, "Mitigating Catastrophic Forgetting in Large Language Models with Self-Synthesized
Rehearsal" (ACL 2024, arXiv 2403.01244). After task t:

1. Demonstrations: `demonstrations` examples of task t's training split (a seeded draw), the only
   real data SSR reads.
2. Synthetic inputs: `candidates` in-context prompts, each `shots` demonstrations' prompts (a seeded
   draw per prompt, in drawn order) after HEADER and followed by SEPARATOR, ending in HEADER. The
   STARTING model (a frozen copy of the weights the run began with, taken in `setup`) continues each
   prompt, sampling at `temperature` from a generator seeded by the run's seed and t (every rank
   draws the same tokens); the text before the next separator is a new input. Empty and repeated
   inputs are dropped.
3. Selection: k-means with k = `synthetic` (k-means++ seeding from a generator seeded by the run's
   seed and t) on the starting model's mean last hidden state of each input, normalised to unit
   length; per cluster the input nearest its centre is kept (every input when there are no more
   than k). The starting model embeds, so the space does not drift from task to task.
4. Answers: the CURRENT model (after task t) answers the kept inputs as the evaluation would (the
   task's prompt format and post-processing): what the model knows of task t is what later tasks
   rehearse (the paper's refinement by the latest model).

Later tasks train on their own examples plus every kept synthetic example of the earlier tasks,
mixed in once per task (as replay mixes its buffer by default). After the last task nothing is
written. The starting model's copy costs a whole model's memory for the run.

Not the paper's setup: its encoder for the selection is not reproduced (the starting model embeds)
and its SuperNI prompts carry the task's instruction, while these inputs imitate the task's prompts
as they are. A demonstration that itself contains "###" cuts the inputs written after it short.
Temperature 0 writes greedily (diversity then comes only from which demonstrations each prompt shows,
in what order).

`demonstrations` and `shots` above what a task has are capped to it, with a warning; the counts
each task used are in results.json's `strategy_used` (so two settings capped alike are seen as one).

State: the kept examples and the per-task counts (demonstrations, shots, prompts, distinct inputs, kept) as
the UTF-8 bytes of one JSON document, as replay keeps its buffer; RUN_DIR/ssr/synthetic.json shows
them. The starting model's copy is not state: `setup` runs before a resume restores the weights.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clbench.console import say
from clbench.data.tasks import Example
from clbench.distributed import broadcast_object, local
from clbench.encoding import mean_last_hidden
from clbench.files import write_json
from clbench.strategy import (
    CLStrategy,
    StrategyContext,
    examples_json,
    json_examples,
    json_tensor,
    tensor_json,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HEADER, SEPARATOR = "Input:", "\n###\n"


def icl_prompt(demos: list[Example]) -> str:
    """The demonstrations' prompts, each after HEADER and closed by SEPARATOR, then HEADER: the model's
    continuation is a new input."""
    return "".join(f"{HEADER} {demo.prompt}{SEPARATOR}" for demo in demos) + HEADER


def first_input(generated: str) -> str:
    """The text a continuation writes before its next separator."""
    return generated.split(SEPARATOR.strip(), 1)[0].strip()


def kmeans_representatives(
    x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 25
) -> list[int]:
    """Indices (ascending) of k distinct rows of x (n, d): k-means with k-means++ seeding, then per centre
    the nearest row not yet taken. Every row when k >= n."""
    n = x.shape[0]
    if k >= n:
        return list(range(n))
    x = x.double()
    centres = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centres).min(dim=1).values.square()
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        centres = torch.cat([centres, x[torch.multinomial(weights, 1, generator=generator)]])
    for _ in range(iterations):  # Lloyd's steps; an empty cluster keeps its centre
        assign = torch.cdist(x, centres).argmin(dim=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    chosen: list[int] = []
    for row in torch.cdist(centres, x).argsort(dim=1).tolist():  # (k, n): rows by distance to each centre
        chosen.append(next(i for i in row if i not in chosen))
    return sorted(chosen)


@torch.no_grad()
def mean_hidden_states(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> torch.Tensor:
    """(len(texts), d) fp32: each text's last-layer hidden states averaged over its tokens. Every rank
    runs every batch (a sharded model needs every rank in every forward)."""
    device = local(next(model.parameters())).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt").to(device)
        out.append(mean_last_hidden(model, batch["input_ids"], batch["attention_mask"]))
    return torch.cat(out).cpu()


class SSR(CLStrategy):
    """Rehearse synthetic examples: inputs the starting model writes from a few demonstrations of each
    finished task, answered by the model as it was after that task, a diverse subset kept.

    Args:
        demonstrations: Training examples of each task the in-context prompts draw from.
        shots: Demonstrations in one in-context prompt.
        candidates: In-context prompts (so at most that many synthetic inputs) per task.
        synthetic: Synthetic examples kept per task (k of the k-means selection).
        max_input_tokens: Longest synthetic input generated, in tokens; an input is also kept no longer
            than the longest demonstration's prompt (plus the separator's few tokens).
        temperature: Sampling temperature of the starting model's inputs (0: greedy; 0.7 is a common
            choice, not taken from the paper).
    """

    def __init__(
        self,
        demonstrations: int = 8,
        shots: int = 3,
        candidates: int = 60,
        synthetic: int = 20,
        max_input_tokens: int = 128,
        temperature: float = 0.7,
    ) -> None:
        for option, value in (("demonstrations", demonstrations), ("shots", shots), ("synthetic", synthetic)):
            if value < 1:
                raise ValueError(f"ssr.{option} must be a positive count, got {value}")
        if shots > demonstrations:
            raise ValueError(f"ssr.shots ({shots}) cannot exceed ssr.demonstrations ({demonstrations})")
        if candidates < synthetic:
            raise ValueError(f"ssr.candidates ({candidates}) must be at least ssr.synthetic ({synthetic})")
        if max_input_tokens < 1:
            raise ValueError(f"ssr.max_input_tokens must be positive, got {max_input_tokens}")
        if temperature < 0:
            raise ValueError(f"ssr.temperature must be >= 0, got {temperature}")
        self.demonstrations, self.shots, self.candidates = demonstrations, shots, candidates
        self.synthetic, self.max_input_tokens, self.temperature = synthetic, max_input_tokens, temperature
        self.examples: list[tuple[int, Example]] = []  # (task index, synthetic example)
        self.counts: dict[str, dict[str, int]] = {}  # per task name
        self.starting: torch.nn.Module | None = None

    def setup(self, ctx: StrategyContext) -> None:
        self.starting = ctx.service().frozen_copy()  # before a resume restores the trained weights

    def training_examples(self, ctx: StrategyContext, examples: list[Example]) -> list[Example]:
        return examples + [ex for _, ex in self.examples]

    def on_task_end(self, ctx: StrategyContext) -> None:
        t, services = ctx.task_index, ctx.service()
        if t == len(ctx.stream) - 1:  # no later task would rehearse them
            return
        rng = random.Random(f"ssr-{ctx.seed}-{t}")
        demos = rng.sample(ctx.task.train, min(self.demonstrations, len(ctx.task.train)))
        shots = min(self.shots, len(demos))
        if len(demos) < self.demonstrations:
            say(
                f"clbench: warning: ssr: task {ctx.task.name} has {len(demos)} training examples: "
                f"demonstrations {self.demonstrations} -> {len(demos)}, shots {self.shots} -> {shots} (as "
                "any larger setting would; results.json's strategy_used records what each task used)"
            )
        prompts = [icl_prompt(rng.sample(demos, shots)) for _ in range(self.candidates)]
        seed = ctx.seed * 1000 + t
        texts = services.generate_text(
            prompts, self._input_tokens(ctx, demos), self.starting, self.temperature, seed
        )
        # the same on every rank already; rank 0's lists make sure that every rank embeds, selects and
        # trains on the same texts, whatever an accelerator's kernels do to the last bits
        inputs = broadcast_object(list(dict.fromkeys(x for x in map(first_input, texts) if x)))
        kept = broadcast_object(self._diverse(ctx, inputs, seed))
        answers = services.predict(ctx.task, [Example(x, "") for x in kept]) if kept else []
        new = [Example(x, a) for x, a in zip(kept, answers, strict=True)]
        self.examples += [(t, ex) for ex in new]
        self.counts[ctx.task.name] = {
            "demonstrations": len(demos),
            "shots": shots,
            "prompts": len(prompts),
            "inputs": len(inputs),
            "kept": len(new),
        }
        if ctx.writes:
            self._write(ctx)

    def _input_tokens(self, ctx: StrategyContext, demos: list[Example]) -> int:
        longest = max(len(ctx.module.tokenizer(d.prompt)["input_ids"]) for d in demos)
        return min(self.max_input_tokens, longest + 4)

    def _diverse(self, ctx: StrategyContext, inputs: list[str], seed: int) -> list[str]:
        if len(inputs) <= self.synthetic:
            return inputs
        embeddings = mean_hidden_states(self.starting, ctx.module.tokenizer, inputs, batch_size=16)
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        generator = torch.Generator().manual_seed(seed)
        return [inputs[i] for i in kmeans_representatives(embeddings, self.synthetic, generator)]

    def _write(self, ctx: StrategyContext) -> None:
        names = ctx.stream.names
        rows = [{"task": names[t], "prompt": ex.prompt, "answer": ex.answer} for t, ex in self.examples]
        path = Path(ctx.run_dir) / "ssr" / "synthetic.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"counts": self.counts, "examples": rows})

    def used(self) -> dict[str, dict[str, int]]:
        """Per finished task, the demonstrations and shots drawn (capped by the task's training
        examples), the prompts written, the distinct inputs and the examples kept."""
        return self.counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        doc = {"counts": self.counts, "examples": examples_json(self.examples)}
        return {"synthetic": json_tensor(doc)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        doc = tensor_json(state["synthetic"])
        self.counts = doc["counts"]
        self.examples = json_examples(doc["examples"])
