"""SSR: inputs written by the starting model from the task's demonstrations, answered by the trained
model, a diverse subset of the configured size kept and rehearsed by later tasks."""

import json

import pytest
import torch

from clbench.data.tasks import Example
from clbench.module import CLModule
from strategies.ssr import HEADER, SEPARATOR, SSR, first_input, icl_prompt, kmeans_representatives


@pytest.fixture
def make_module(tiny_model_dir):
    """A random tiny Llama with a byte-level tokenizer: SEPARATOR and any text the model writes encode
    (the word-level model of the other strategy tests would write only unknown tokens here)."""

    def make() -> CLModule:
        torch.manual_seed(0)
        return CLModule(model=str(tiny_model_dir), lr=1e-2)

    return make


def recording(ctx) -> list[tuple[list[str], int, torch.nn.Module | None, float, int]]:
    """Every generate_text call the strategy makes through this context's services."""
    calls, real = [], ctx.services.generate_text

    def generate_text(prompts, max_new_tokens, model=None, temperature=0.0, seed=0, ended=False):
        calls.append((list(prompts), max_new_tokens, model, temperature, seed))
        return real(prompts, max_new_tokens, model, temperature, seed, ended)

    ctx.services.generate_text = generate_text
    return calls


def test_inputs_come_from_the_starting_model_shown_the_demonstrations(
    make_module, make_ctx, stream_of, fit_task
):
    module, stream = make_module(), stream_of(12, 12)
    ssr = SSR(demonstrations=4, shots=2, candidates=12, synthetic=5)
    ctx = make_ctx(module, stream, 0)
    ssr.setup(ctx)
    calls = recording(ctx)
    fit_task(module, ssr, ctx, steps=4)

    (prompts, max_new_tokens, model, temperature, seed), *more = calls
    assert not more and model is ssr.starting and len(prompts) == 12 and temperature == 0.7
    train = {ex.prompt for ex in ctx.task.train}
    shown = [[d.removeprefix(f"{HEADER} ") for d in p.split(SEPARATOR)[:-1]] for p in prompts]
    assert all(
        p.endswith(SEPARATOR + HEADER) and len(demos) == 2 for p, demos in zip(prompts, shown, strict=True)
    )
    assert {d for demos in shown for d in demos} <= train and len({d for ds in shown for d in ds}) <= 4

    starting = make_module()  # the same seed: the weights the run began with
    trained = dict(module.model.named_parameters())
    initial = dict(starting.model.named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in ssr.starting.named_parameters())
    assert not all(torch.equal(p, trained[n]) for n, p in ssr.starting.named_parameters())  # training moved
    again = {"batch_size": 4, "temperature": temperature, "seed": seed}  # the toy services' batches
    written = {first_input(x) for x in module.generate_text(prompts, max_new_tokens, starting.model, **again)}
    by_trained = {first_input(x) for x in module.generate_text(prompts, max_new_tokens, **again)}
    kept = [ex.prompt for _, ex in ssr.examples]
    assert set(kept) <= written and not set(kept) <= by_trained  # the starting model wrote them

    answers = [ex.answer for _, ex in ssr.examples]
    queries = [Example(x, "") for x in kept]
    assert answers == ctx.services.predict(ctx.task, queries)  # the model after the task answered
    assert answers != make_ctx(starting, stream, 0).services.predict(ctx.task, queries)
    assert ssr.counts == {
        "alpha": {"demonstrations": 4, "shots": 2, "prompts": 12, "inputs": len(written - {""}), "kept": 5}
    }
    assert all(t == 0 for t, _ in ssr.examples)


def test_later_tasks_rehearse_every_earlier_task_s_synthetic_examples(
    make_module, make_ctx, stream_of, fit_task
):
    module, stream = make_module(), stream_of(12, 12, 12)
    ssr = SSR(demonstrations=6, shots=2, candidates=16, synthetic=3)
    ssr.setup(make_ctx(module, stream, 0))
    ctx0 = make_ctx(module, stream, 0)
    assert ssr.training_examples(ctx0, ctx0.task.train) == ctx0.task.train
    fit_task(module, ssr, ctx0, steps=2)
    fit_task(module, ssr, make_ctx(module, stream, 1), steps=2)
    assert [t for t, _ in ssr.examples] == [0, 0, 0, 1, 1, 1]  # the configured count, per task
    assert ssr.counts["beta"]["kept"] == 3 and ssr.counts["beta"]["inputs"] >= 3
    ctx2 = make_ctx(module, stream, 2)
    mixed = ssr.training_examples(ctx2, ctx2.task.train)
    assert mixed == ctx2.task.train + [ex for _, ex in ssr.examples]
    fit_task(module, ssr, ctx2, steps=1)
    assert len(ssr.examples) == 6 and "gamma" not in ssr.counts  # nothing after the last task
    written = json.loads((ctx2.run_dir / "ssr" / "synthetic.json").read_text())
    assert written["counts"] == ssr.counts
    assert [(r["task"], r["prompt"], r["answer"]) for r in written["examples"]] == [
        (stream.names[t], ex.prompt, ex.answer) for t, ex in ssr.examples
    ]


def test_kmeans_keeps_one_input_per_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = torch.cat([c + 0.1 * torch.randn(7, 2, generator=gen) for c in centres])  # 3 blobs of 7
    chosen = kmeans_representatives(x, 3, torch.Generator().manual_seed(1))
    assert sorted(i // 7 for i in chosen) == [0, 1, 2]
    assert chosen == kmeans_representatives(x, 3, torch.Generator().manual_seed(1))  # deterministic
    nearest = [
        min(range(7 * b, 7 * b + 7), key=lambda i: (x[i] - x[7 * b : 7 * b + 7].mean(0)).norm())
        for b in range(3)
    ]
    assert chosen == nearest  # each the member nearest its cluster's centre
    assert kmeans_representatives(x[:2], 5, gen) == [0, 1]


def test_prompt_and_cut():
    demos = [Example("first input", "a"), Example("second\ninput", "b")]
    prompt = icl_prompt(demos)
    assert prompt == "Input: first input\n###\nInput: second\ninput\n###\nInput:"
    assert first_input(" third\ninput\n###\nfourth") == "third\ninput"
    assert first_input("\n###\n") == ""


def test_state_round_trip():
    ssr = SSR()
    ssr.examples = [(0, Example('ünïcode — "quoted"', "yes")), (2, Example("b", ""))]
    ssr.counts = {"alpha": {"demonstrations": 8, "prompts": 60, "inputs": 41, "kept": 20}}
    restored = SSR()
    restored.load_state_dict(ssr.state_dict())
    assert restored.examples == ssr.examples and restored.counts == ssr.counts
    assert all(v.dtype == torch.uint8 for v in ssr.state_dict().values())


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"demonstrations": 0}, "demonstrations"),
        ({"shots": 0}, "shots"),
        ({"synthetic": 0}, "synthetic"),
        ({"shots": 9, "demonstrations": 8}, "shots"),
        ({"candidates": 10, "synthetic": 20}, "candidates"),
        ({"max_input_tokens": 0}, "max_input_tokens"),
        ({"temperature": -0.1}, "temperature"),
    ],
)
def test_invalid_options_name_themselves(kwargs, option):
    with pytest.raises(ValueError, match=f"ssr.{option}"):
        SSR(**kwargs)
