"""Soft prompts (clbench.prompts): every caller of the model sees them, each exactly as a hand-built
inputs_embeds call with the prompt in front would, left padding included."""

from __future__ import annotations

import copy

import pytest
import torch

from clbench.data.collate import LeftPadCollator, position_ids_for
from clbench.distributed import fsdp_root
from clbench.models import LoRA
from clbench.module import CLModule

PROMPTS = ["Upper cat:", "A much longer prompt about a dog:", "x"]
ANSWERS = ["CAT", "DOG", "X"]


@pytest.fixture
def module(tiny_model_dir) -> CLModule:
    torch.manual_seed(0)
    m = CLModule(model=str(tiny_model_dir))
    m.add_prompt("first", 3, seed=1)
    m.add_prompt("second", 2, seed=2)
    with torch.no_grad():  # away from the vocabulary rows, so a prompt clearly moves the logits
        for p in fsdp_root(m.model).clbench_soft_prompts.parameters():
            p.add_(torch.randn_like(p))
    m.set_prompts(["second", "first"])
    return m.eval()


def batch_of(module: CLModule, answers: bool = True) -> dict:
    tok = module.tokenizer
    items = [
        {
            "prompt_ids": tok(p)["input_ids"],
            "answer_ids": tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if answers
            else [],
            "max_new_tokens": 5,
        }
        for p, a in zip(PROMPTS, ANSWERS)
    ]
    return LeftPadCollator(tok.pad_token_id)(items)


def prompt_rows(module: CLModule, names: list[str]) -> torch.Tensor:
    return torch.cat([fsdp_root(module.model).clbench_soft_prompts.prompts[n] for n in names]).detach()


def by_hand(module: CLModule, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of the caller's positions, the prompt rows put in front by hand; rows (n, d) or (B, n, d)."""
    lm = fsdp_root(module.model)
    rows = rows.expand(ids.shape[0], -1, -1) if rows.dim() == 2 else rows
    embeds = torch.cat([rows, lm.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, rows.shape[1]), mask], 1)
    prompts = lm.clbench_soft_prompts
    saved = prompts.active, prompts.select
    prompts.active, prompts.select = [], None  # the hooks idle: this call is the plain model's
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids_for(full_mask))
    finally:
        prompts.active, prompts.select = saved
    return out.logits[:, rows.shape[1] :]


def test_the_prompted_forward_is_the_hand_built_one(module):
    batch = batch_of(module)
    with torch.no_grad():
        logits = module(batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape  # the prompt's positions are dropped
    expected = by_hand(
        module, batch["input_ids"], batch["attention_mask"], prompt_rows(module, ["second", "first"])
    )
    real = batch["attention_mask"].bool()  # a padding position's logits are nobody's
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-6)
    with torch.no_grad():  # lm-eval's call: input_ids by position, no mask
        plain = module.model(batch["input_ids"][1:2]).logits
    row = batch["input_ids"][1:2]
    torch.testing.assert_close(
        plain,
        by_hand(module, row, torch.ones_like(row), prompt_rows(module, ["second", "first"])),
        rtol=0,
        atol=1e-6,
    )


def test_the_loss_counts_the_answer_tokens_only(module):
    batch = batch_of(module)
    with torch.no_grad():
        loss = module(batch).loss
    logits = by_hand(
        module, batch["input_ids"], batch["attention_mask"], prompt_rows(module, ["second", "first"])
    )
    labels = batch["labels"]
    answer = labels[:, 1:] != -100  # the causal shift: position i predicts token i + 1
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][answer], labels[:, 1:][answer])
    assert answer.sum() == sum(
        len(module.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in ANSWERS
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_greedy_generation_is_a_manual_greedy_loop_without_cache(module):
    """CLModule.generate (KV cache) against a loop that rebuilds the whole prompted input at every step:
    the same tokens, and each step's logits equal (a decode step's mask or positions off by the
    prompt's length would move them)."""
    batch = batch_of(module, answers=False)
    assert (batch["attention_mask"] == 0).any()  # left padding of prompts of different lengths
    texts = module.generate(batch)
    with torch.no_grad():
        out = module.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=module._greedy(5),
            output_logits=True,
            return_dict_in_generate=True,
        )
    rows = prompt_rows(module, ["second", "first"])
    ids, mask, tok = batch["input_ids"], batch["attention_mask"], module.tokenizer
    for step in range(len(out.logits)):
        logits = by_hand(module, ids, mask, rows)[:, -1]
        torch.testing.assert_close(out.logits[step], logits, rtol=0, atol=1e-5)
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    manual = []
    for row in ids[:, batch["input_ids"].shape[1] :].tolist():
        cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)  # EOS ends a row
        manual.append(tok.decode(row[:cut], skip_special_tokens=True))
    assert texts == manual and len(out.logits) > 1
    module.set_prompts([])
    assert module.generate(batch) != texts  # the prompt changed what the model says


def test_generate_text_sees_the_prompts(module):
    text = module.generate_text([PROMPTS[1]], 4)
    ids = module.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    rows = prompt_rows(module, ["second", "first"])
    for _ in range(4):
        ids = torch.cat([ids, by_hand(module, ids, torch.ones_like(ids), rows)[:, -1:].argmax(-1)], 1)
    out = ids[0, -4:].tolist()
    eos = module.tokenizer.eos_token_id
    assert text == [
        module.tokenizer.decode(out[: out.index(eos) + 1] if eos in out else out, skip_special_tokens=True)
    ]


def test_each_prompt_acts_and_none_gives_the_model_without_prompts(module, tiny_model_dir):
    batch = batch_of(module)
    with torch.no_grad():
        both = module(batch).logits
        module.set_prompts(["second"])
        one = module(batch).logits
        module.set_prompts([])
        none = module(batch).logits
    assert not torch.allclose(both, one, atol=1e-3)
    torch.manual_seed(0)
    plain = CLModule(model=str(tiny_model_dir)).eval()
    with torch.no_grad():
        assert torch.equal(none, plain(batch).logits)


def test_only_trainable_prompts_train_and_the_backbone_can_be_frozen(module):
    module.set_prompts(["second", "first"], trainable=["first"])
    module.freeze_backbone()
    trainable = module.trainable_parameters()
    assert list(trainable) == ["clbench_soft_prompts.prompts.first"]
    module(batch_of(module)).loss.backward()
    assert trainable["clbench_soft_prompts.prompts.first"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="trainable within active"):
        module.set_prompts(["second"], trainable=["first"])


def test_per_row_prompts_chosen_by_a_selector(module):
    """L2P's shape: a pool of prompts, each row its own, chosen inside the forward from the input;
    the gradient reaches exactly the pool entries some row used."""
    batch = batch_of(module)
    module.add_prompt("pool", 4 * 4, init=torch.randn(16, 32))  # 4 prompts of 4 tokens
    pool = fsdp_root(module.model).clbench_soft_prompts.prompts["pool"]
    choice = torch.tensor([2, 0, 2])  # the prompt of each row (L2P: by key-query matching)

    def select(ids, embeds, mask):
        return pool.view(4, 4, 32)[choice[: ids.shape[0]]]  # (B, 4, d)

    module.set_prompts([], trainable=["pool"], select=select)
    module.freeze_backbone()
    module(batch).loss.backward()
    used = pool.grad.view(4, 4, 32).abs().sum((1, 2)) > 0
    assert used.tolist() == [True, False, True, False]
    with torch.no_grad():
        logits = module(batch).logits
    table = pool.detach().view(4, 4, 32)[choice]
    expected = by_hand(module, batch["input_ids"], batch["attention_mask"], table)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-6)
    other = by_hand(
        module, batch["input_ids"], batch["attention_mask"], pool.detach().view(4, 4, 32)[[1, 0, 2]]
    )
    assert not torch.allclose(logits[0][real[0]], other[0][real[0]], atol=1e-3)  # row 0's own prompt acted


def test_a_deep_copy_has_its_own_prompts_and_the_state_dict_holds_them(module):
    twin = copy.deepcopy(module.model)
    batch = batch_of(module)
    with torch.no_grad():
        before = twin(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        module.set_prompts(["first"])  # the original changes; the copy keeps its own order
        after = twin(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.equal(before, after)
    assert {"clbench_soft_prompts.prompts.first", "clbench_soft_prompts.prompts.second"} <= set(
        module.model.state_dict()
    )


def test_the_sharded_frozen_copy_s_twin_has_the_same_prompts(module):
    """frozen_copy under FSDP2 builds a twin from the configuration and copies every tensor by name."""
    from clbench.module import _same_architecture

    with torch.device("meta"):
        twin = _same_architecture(module.model)
    shapes = {n: p.shape for n, p in twin.named_parameters()}
    assert shapes == {n: p.shape for n, p in module.model.named_parameters()}
    assert fsdp_root(twin).clbench_soft_prompts.active == ["second", "first"]


def test_inside_a_peft_wrapper_the_prompt_acts_on_the_inner_model(tiny_model_dir):
    torch.manual_seed(0)
    m = CLModule(model=str(tiny_model_dir), lora=LoRA(r=4, alpha=8, dropout=0.0)).eval()
    m.add_prompt("p", 3, seed=1)
    m.set_prompts(["p"])
    batch = batch_of(m)
    with torch.no_grad():
        logits = m(batch).logits
    expected = by_hand(m, batch["input_ids"], batch["attention_mask"], prompt_rows(m, ["p"]))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-6)
    assert "base_model.model.clbench_soft_prompts.prompts.p" in dict(m.model.named_parameters())
    assert len(m.generate(batch_of(m, answers=False))) == len(PROMPTS)


def test_lm_eval_s_log_likelihoods_see_the_prompts(module):
    """General ability (clbench.evaluation.general): lm-eval's HFLM calls the model itself, with
    right-padded batches and no mask; its log-likelihoods are those of the prompted model."""
    from lm_eval.api.instance import Instance

    from clbench.evaluation.general import _live_lm_class

    pairs = [("Upper cat:", " CAT"), ("A much longer prompt about a dog:", " DOG and more")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    lm = _live_lm_class()(module.model, module.tokenizer, 2, None)
    scores = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    rows = prompt_rows(module, ["second", "first"])
    for (context, continuation), score in zip(pairs, scores):
        ctx, cont = lm._encode_pair(context, continuation)
        inp = torch.tensor([ctx + cont][0][:-1])[None]
        logprobs = by_hand(module, inp, torch.ones_like(inp), rows).log_softmax(-1)[0, -len(cont) :]
        expected = logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
    module.set_prompts([])
    plain = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert all(abs(a - b) > 1e-3 for a, b in zip(plain, scores))


def test_the_plugin_page_s_prompt_example_trains_its_task_s_prompt_only(tiny_model_dir, tmp_path):
    import re

    from plugin_example import DOC

    from clbench.data.tasks import Example, Task, TaskStream
    from clbench.testing import fit_task, make_context

    code = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "add_prompt" in b)
    namespace: dict = {}
    exec(code, namespace)
    tasks = [Task(n, train=[Example(f"{n} {i}:", "yes") for i in range(8)], test=[]) for n in ("a", "b")]
    stream, strategy = TaskStream("two", tasks), namespace["OnePromptPerTask"]()
    torch.manual_seed(0)
    module = CLModule(model=str(tiny_model_dir), lr=1e-2)
    strategy.prepare_model(make_context(module, stream, 0, tmp_path))
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_task(module, strategy, make_context(module, stream, 1, tmp_path), steps=2)
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, weights[n])}
    assert moved == {"clbench_soft_prompts.prompts.task1"}
