"""Two real CPU processes (gloo) against one process: a tiny tied-embedding Llama, a 3-task stream.

Every run is a real `python -m clbench fit` in a subprocess; under `--trainer.devices 2` Lightning's
launcher starts the second rank by re-running the command, exactly as a user's run does. The
one-process reference has the same global batch (2 x 4 examples).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from plugin_example import write_plugin_example
from twoproc import PER_RANK_BATCH

from clbench.testing import save_tiny_model, tiny_llama, toy_tasks, word_tokenizer, write_trace_folder


@pytest.fixture(scope="session")
def toy_setup(tmp_path_factory) -> Path:
    """A folder with the model, a TRACE-style stream and its config (fp32, 1 epoch per task)."""
    root = tmp_path_factory.mktemp("two-process")
    tasks = toy_tasks(n_train=20, n_test=10)  # 20 = 2 full global batches of 8 and a last one of 4
    corpus = [ex["prompt"] + " " + ex["answer"] for t in tasks.values() for s in t.values() for ex in s]
    save_tiny_model(root / "model", corpus * 4, tied=True)
    # LFPT5's model: a word-level vocabulary (the corpus split as its pre-tokenizer splits) with the two
    # markers, so that the random model now and then writes a parseable pseudo example (a byte-level
    # one never writes a marker)
    tok = word_tokenizer([*re.findall(r"\w+|[^\w\s]+", " ".join(corpus)), "__gen__", "__ans__"])
    tiny_llama(len(tok), tied=True, bos_token_id=None).save_pretrained(root / "lfpt5-model")
    tok.save_pretrained(root / "lfpt5-model")
    write_trace_folder(root / "TRACE", tasks)
    write_plugin_example(root)  # docs/plugins.md's strategy: `python -m clbench` finds it in its folder
    config = {
        "model": {"model": str(root / "model"), "lr": 3e-3},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "log_every_n_steps": 1},
        "stream": {
            "name": "toy",
            "data_root": str(root / "TRACE"),
            "batch_size": PER_RANK_BATCH,
            "eval_batch_size": 4,
            "tasks": [
                {"name": n, "path": n, "epochs": 1, "max_new_tokens": 4, "metric": m}
                for n, m in (("parity", "exact_match"), ("reverse", "edit_similarity"), ("upper", "rouge_l"))
            ],
        },
    }
    (root / "toy.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root
