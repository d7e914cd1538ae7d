"""Build the offline quickstart task stream under data/quickstart/ from text shipped in packages.

Four tasks, each a TRACE folder of train/eval/test.json lists of {"prompt", "answer"}:

  FortuneTopic   Debian `fortunes`:     topic classification of short fortune-cookie quotes
  WordAnalogy    PyPI `gensim` wheel:   questions-words.txt analogies, split by answer pair
  WordNetDefWord Debian `wordnet-base`: definition -> word, split by word
  PyNextLine     CPython stdlib source: next line of code, split by source file

Sources (install these first; the builder says which one is missing):

  apt-get install fortunes wordnet-base
  pip download gensim==4.4.0 --no-deps -d /tmp/gensim     (the wheel is only read, never installed)

Everything is seeded and sorted, so the same package versions and the same Python version give
byte-identical files. `--check` rebuilds in memory and compares with the committed files.

Usage:
  python tools/build_quickstart_data.py [--out data/quickstart] [--gensim-wheel PATH] [--check]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import sysconfig
import textwrap
import tokenize
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

SEED = 20240611
N_TRAIN, N_EVAL, N_TEST = 300, 50, 150
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "data" / "quickstart"

# Longest prompt (all splits) under the SmolLM2-135M-Instruct tokenizer, measured on the committed files.
MEASURED_MAX_PROMPT_TOKENS = {"FortuneTopic": 60, "WordAnalogy": 18, "WordNetDefWord": 26, "PyNextLine": 56}

# Versions the committed files were built from; other versions may give different files.
BUILT_WITH = {
    "fortunes": "1:1.99.1-7.3",
    "wordnet-base": "1:3.0-37",
    "gensim": "4.4.0",
    "python": "3.11.7",
}


class SourceMissing(SystemExit):
    pass


def missing(what: str, how: str) -> SourceMissing:
    return SourceMissing(f"error: {what} not found.\n  Install it with: {how}")


def rng_for(task: str) -> random.Random:
    """One independent, seeded generator per task, so tasks do not shift each other."""
    return random.Random(f"{SEED}:{task}")


def dpkg_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def take_splits(items: list, n_train: int, n_eval: int, n_test: int) -> tuple[list, list, list]:
    return (
        items[:n_train],
        items[n_train : n_train + n_eval],
        items[n_train + n_eval : n_train + n_eval + n_test],
    )


def round_robin(groups: list[list]) -> list:
    """Interleave lists: first items of every group, then second items, and so on."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def approx_tokens(text: str) -> int:
    """A tokenizer-free upper-bound-ish count: words, single digits, symbols, runs of spaces, newlines.

    The builder needs no tokenizer this way. On fortunes and stdlib snippets the SmolLM2 tokenizer
    gives 0.6-1.6 tokens per piece; the bounds below were tuned against it so every prompt stays
    at or under about 60 tokens.
    """
    return len(re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]| {2,}|\n", text))


# --- 1. FortuneTopic ----------------------------------------------------------------------------------

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_TOPICS = ("computers", "food", "love", "politics", "startrek")
FORTUNE_PER_TOPIC = (60, 10, 30)  # train, eval, test per topic: 5 x (60, 10, 30) = 300 / 50 / 150
FORTUNE_MIN_CHARS, FORTUNE_MAX_CHARS = 20, 140
FORTUNE_MAX_PROMPT_PIECES = 52  # approx_tokens() bound on the whole prompt (~60 SmolLM2 tokens at most)


def fortune_prompt(text: str) -> str:
    return f"Fortune: {text}\nTopic (one of: {', '.join(FORTUNE_TOPICS)}):"


def read_fortunes(topic: str) -> list[str]:
    path = FORTUNE_DIR / topic
    if not path.is_file():
        raise missing(f"fortune file {path}", "apt-get install fortunes")
    text = path.read_text(encoding="utf-8")
    entries = re.split(r"^%$", text, flags=re.M)
    return [" ".join(e.split()) for e in entries if e.strip()]


def build_fortunes() -> tuple[dict[str, list[dict]], dict]:
    entries = {t: read_fortunes(t) for t in FORTUNE_TOPICS}
    seen_in = Counter(e for t in FORTUNE_TOPICS for e in set(entries[t]))
    rng = rng_for("FortuneTopic")
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    pool_sizes = {}
    for topic in FORTUNE_TOPICS:
        # Unique within the topic, never in two chosen topics, short enough for a ~60-token prompt,
        # no control characters (some entries underline words with backspaces).
        pool = sorted(
            {
                e
                for e in entries[topic]
                if FORTUNE_MIN_CHARS <= len(e) <= FORTUNE_MAX_CHARS
                and seen_in[e] == 1
                and e.isprintable()
                and approx_tokens(fortune_prompt(e)) <= FORTUNE_MAX_PROMPT_PIECES
            }
        )
        pool_sizes[topic] = len(pool)
        need = sum(FORTUNE_PER_TOPIC)
        if len(pool) < need:
            raise SystemExit(f"error: fortunes/{topic} has {len(pool)} usable entries, need {need}")
        rng.shuffle(pool)
        parts = take_splits(pool, *FORTUNE_PER_TOPIC)
        for split, part in zip(("train", "eval", "test"), parts, strict=True):
            splits[split].extend({"prompt": fortune_prompt(e), "answer": topic} for e in part)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits, {"pool_sizes": pool_sizes}


# --- 2. WordAnalogy -----------------------------------------------------------------------------------

ANALOGY_MEMBER = "gensim/test/test_data/questions-words.txt"
ANALOGY_SECTIONS = (
    "capital-common-countries",
    "family",
    "gram1-adjective-to-adverb",
    "gram3-comparative",
    "gram4-superlative",
    "gram5-present-participle",
    "gram6-nationality-adjective",
    "gram8-plural",
)
ANALOGY_EVAL_FRAC, ANALOGY_TEST_FRAC = 0.1, 0.3


def analogy_prompt(a: str, b: str, c: str) -> str:
    return f"Analogy: {a} is to {b} as {c} is to ?\nAnswer:"


def find_gensim_wheel(explicit: str | None) -> Path:
    how = "pip download gensim==4.4.0 --no-deps -d /tmp/gensim   (then pass --gensim-wheel if elsewhere)"
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise missing(f"gensim wheel {path}", how)
        return path
    found = sorted(glob.glob("/tmp/gensim/gensim-*.whl"))
    if not found:
        raise missing("gensim wheel (/tmp/gensim/gensim-*.whl)", how)
    return Path(found[-1])


def read_analogies(wheel: Path) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
    with zipfile.ZipFile(wheel) as z:
        try:
            raw = z.read(ANALOGY_MEMBER)
        except KeyError:
            raise SystemExit(f"error: {wheel} has no {ANALOGY_MEMBER}") from None
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in raw.decode("utf-8").splitlines():
        if line.startswith(":"):
            current = line[1:].strip()
            sections[current] = []
        elif line.strip():
            a, b, c, d = line.split()
            sections[current].append((a, b, c, d))
    return sections, hashlib.sha256(raw).hexdigest()


def build_analogies(wheel: Path) -> tuple[dict[str, list[dict]], dict]:
    sections, sha = read_analogies(wheel)
    rng = rng_for("WordAnalogy")
    # Split by answer word (case-folded): a pair goes where its second word goes, so a test answer
    # pair, or its answer word, never occurs in any training example.
    word_split: dict[str, str] = {}
    pair_counts = {}
    for name in ANALOGY_SECTIONS:
        pairs = sorted({(a, b) for a, b, _, _ in sections[name]} | {(c, d) for _, _, c, d in sections[name]})
        pair_counts[name] = len(pairs)
        new = sorted({b.lower() for _, b in pairs} - word_split.keys())
        rng.shuffle(new)
        n_test = round(len(new) * ANALOGY_TEST_FRAC)
        n_eval = max(1, round(len(new) * ANALOGY_EVAL_FRAC))
        for i, w in enumerate(new):
            word_split[w] = "test" if i < n_test else "eval" if i < n_test + n_eval else "train"

    def split_of(pair: tuple[str, str]) -> str:
        return word_split[pair[1].lower()]

    candidates: dict[str, list[list[tuple]]] = {"train": [], "eval": [], "test": []}
    for name in ANALOGY_SECTIONS:
        by_split: dict[str, dict[tuple, list]] = {s: defaultdict(list) for s in candidates}
        for a, b, c, d in sections[name]:
            demo, query = split_of((a, b)), split_of((c, d))
            if demo == "train":  # the demonstration pair is always a training pair
                by_split[query][(c, d)].append((a, b, c, d))
        for split, groups in by_split.items():
            # Rotate over answer pairs so each one is used about equally often.
            lists = [sorted(groups[k]) for k in sorted(groups)]
            for lst in lists:
                rng.shuffle(lst)
            rng.shuffle(lists)
            candidates[split].append(round_robin(lists))
    sizes = {"train": N_TRAIN, "eval": N_EVAL, "test": N_TEST}
    splits = {}
    for split, per_section in candidates.items():
        rows = round_robin(per_section)[: sizes[split]]
        if len(rows) < sizes[split]:
            raise SystemExit(f"error: only {len(rows)} analogy candidates for {split}")
        rng.shuffle(rows)
        splits[split] = [{"prompt": analogy_prompt(a, b, c), "answer": d} for a, b, c, d in rows]
    n_pairs = Counter(word_split.values())
    return splits, {
        "sha256": sha,
        "answer_words_per_split": dict(sorted(n_pairs.items())),
        "pairs": pair_counts,
    }


# --- 3. WordNetDefWord --------------------------------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_MAX_LEMMA, WORDNET_MIN_LEMMA = 10, 3
WORDNET_MAX_GLOSS = 90


def definition_prompt(gloss: str) -> str:
    return f"Definition: {gloss}\nWord:"


def sense_rank(count: int, definition: str) -> tuple:
    return -count, len(definition), definition


def build_definitions() -> tuple[dict[str, list[dict]], dict]:
    data, cnt = WORDNET_DIR / "data.noun", WORDNET_DIR / "cntlist.rev"
    for path in (data, cnt):
        if not path.is_file():
            raise missing(f"WordNet file {path}", "apt-get install wordnet-base")
    # Sense-tagged frequency of every sense key in the SemCor-derived counts.
    tag_count = {}
    for line in cnt.read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        tag_count[key] = int(count)
    best: dict[str, tuple[int, str]] = {}
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        head, gloss = line.split("|", 1)
        fields = head.split()
        lex_filenum, n_words = fields[1], int(fields[3], 16)
        words = fields[4 : 4 + 2 * n_words : 2]
        lex_id = int(fields[5], 16)
        lemma = words[0]
        if not (lemma.isascii() and lemma.isalpha() and lemma.islower()):
            continue
        if not WORDNET_MIN_LEMMA <= len(lemma) <= WORDNET_MAX_LEMMA:
            continue
        definition = gloss.split(";")[0].strip()
        if not 10 <= len(definition) <= WORDNET_MAX_GLOSS or '"' in definition:
            continue
        if re.search(rf"\b{lemma[: max(4, len(lemma) - 2)]}", definition, flags=re.I):
            continue  # the definition gives the word (or its stem) away
        count = tag_count.get(f"{lemma}%1:{lex_filenum}:{lex_id:02d}::", 0)
        # Keep each word's most frequent sense; ties go to the shorter definition.
        if lemma not in best or sense_rank(count, definition) < sense_rank(*best[lemma]):
            best[lemma] = (count, definition)
    need = N_TRAIN + N_EVAL + N_TEST
    # The most frequent words (by sense-tagged count), so a small model knows most of them already.
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    seen_defs: set[str] = set()
    chosen = []
    for lemma, (count, definition) in ranked:
        if definition in seen_defs:
            continue
        seen_defs.add(definition)
        chosen.append((lemma, definition, count))
        if len(chosen) == need:
            break
    rng = rng_for("WordNetDefWord")
    chosen.sort()
    rng.shuffle(chosen)
    parts = take_splits(chosen, N_TRAIN, N_EVAL, N_TEST)
    splits = {
        split: [{"prompt": definition_prompt(d), "answer": w} for w, d, _ in part]
        for split, part in zip(("train", "eval", "test"), parts, strict=True)
    }
    return splits, {"min_tag_count": min(c for _, _, c in chosen), "candidates": len(best)}


# --- 4. PyNextLine ------------------------------------------------------------------------------------

CODE_CONTEXT_LINES = 3
CODE_MAX_CONTEXT_CHARS = 150
CODE_MAX_PROMPT_PIECES = 42  # approx_tokens() bound; keeps prompts under ~60 SmolLM2 tokens
CODE_MIN_ANSWER, CODE_MAX_ANSWER = 8, 60
CODE_PER_FILE = 2
CODE_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "ensurepip",
    "__phello__",
    "pydoc_data",
    "tkinter",
    "unittest",
    "distutils",
    "encodings",
}
CODE_FILE_FRACS = {"eval": 0.1, "test": 0.3}


def code_prompt(context: str) -> str:
    return f"Python code:\n{context}\nNext line:"


def code_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of lines holding code: no blank, comment-only or multi-line string lines."""
    skip = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                skip.update(range(tok.start[0], tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    out = []
    for n, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if n in skip or not stripped or stripped.startswith("#") or "\t" in line:
            continue
        out.append((n, line.rstrip()))
    return out


def file_examples(source: str) -> list[tuple[str, str]]:
    lines = code_lines(source)
    out = []
    for i in range(CODE_CONTEXT_LINES, len(lines)):
        window = lines[i - CODE_CONTEXT_LINES : i + 1]
        # Contiguous in the file apart from blank lines and comments (at most 2 skipped lines).
        if any(b[0] - a[0] > 3 for a, b in zip(window, window[1:])):
            continue
        answer = window[-1][1].strip()
        if not CODE_MIN_ANSWER <= len(answer) <= CODE_MAX_ANSWER or not answer.isascii():
            continue
        if answer.startswith(("@", "def ", "class ")) or answer.endswith("\\"):
            continue
        context = textwrap.dedent("\n".join(text for _, text in window[:-1]))
        if len(context) > CODE_MAX_CONTEXT_CHARS or not context.isascii():
            continue
        if approx_tokens(code_prompt(context)) > CODE_MAX_PROMPT_PIECES:
            continue
        if answer in (ln.strip() for ln in context.splitlines()):
            continue
        out.append((context, answer))
    return out


def build_code() -> tuple[dict[str, list[dict]], dict[str, list[str]], dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (stdlib / "os.py").is_file():
        raise missing(
            f"Python standard library source ({stdlib}/os.py)", "a CPython build with its Lib/ sources"
        )
    files = sorted(
        p.relative_to(stdlib).as_posix()
        for p in stdlib.rglob("*.py")
        if not CODE_SKIP_DIRS & set(p.relative_to(stdlib).parts[:-1])
    )
    rng = rng_for("PyNextLine")
    rng.shuffle(files)
    n_test = round(len(files) * CODE_FILE_FRACS["test"])
    n_eval = round(len(files) * CODE_FILE_FRACS["eval"])
    file_split = {
        "test": files[:n_test],
        "eval": files[n_test : n_test + n_eval],
        "train": files[n_test + n_eval :],
    }
    sizes = {"train": N_TRAIN, "eval": N_EVAL, "test": N_TEST}
    splits, sources = {}, {}
    used_prompts: set[str] = set()
    for split, names in file_split.items():
        per_file = []
        for name in names:
            examples = file_examples((stdlib / name).read_text(encoding="utf-8"))
            rng.shuffle(examples)
            per_file.append([(name, ctx, ans) for ctx, ans in examples[:CODE_PER_FILE]])
        rows = []
        for row in round_robin(per_file):
            if row[1] not in used_prompts and len(rows) < sizes[split]:  # same snippet in two files
                used_prompts.add(row[1])
                rows.append(row)
        if len(rows) < sizes[split]:
            raise SystemExit(f"error: only {len(rows)} code examples for {split}")
        rng.shuffle(rows)
        splits[split] = [{"prompt": code_prompt(ctx), "answer": ans} for _, ctx, ans in rows]
        sources[split] = [name for name, _, _ in rows]
    info = {
        "files": {s: len(v) for s, v in file_split.items()},
        "used_files": {s: len(set(v)) for s, v in sources.items()},
    }
    return splits, sources, info


# --- Output -------------------------------------------------------------------------------------------


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def majority_baseline(splits: dict[str, list[dict]]) -> tuple[str, float]:
    train_top = Counter(r["answer"] for r in splits["train"]).most_common(1)[0][0]
    test = splits["test"]
    return train_top, sum(r["answer"] == train_top for r in test) / len(test)


def readme(tasks: dict[str, dict[str, list[dict]]], info: dict) -> str:
    def sizes(name: str) -> str:
        s = tasks[name]
        return f"{len(s['train'])} / {len(s['eval'])} / {len(s['test'])}"

    def example(name: str) -> str:
        ex = tasks[name]["test"][0]
        return f"```\n{ex['prompt']}\n```\nanswer: `{ex['answer']}`"

    top, base = majority_baseline(tasks["FortuneTopic"])
    label_counts = Counter(r["answer"] for r in tasks["FortuneTopic"]["test"])
    v = info["versions"]
    a = info["WordAnalogy"]
    c = info["PyNextLine"]
    rows = [
        ("FortuneTopic", f"Debian `fortunes` {v['fortunes']}", "5-way classification", "exact_match"),
        ("WordAnalogy", f"PyPI `gensim` {v['gensim']} wheel", "word analogy", "exact_match"),
        ("WordNetDefWord", f"Debian `wordnet-base` {v['wordnet-base']}", "definition to word", "exact_match"),
        ("PyNextLine", f"CPython {v['python']} standard library", "next-line completion", "edit_similarity"),
    ]
    table = "\n".join(
        f"| `{name}` | {src} | {kind} | `{metric}` | {sizes(name)} | {MEASURED_MAX_PROMPT_TOKENS[name]} |"
        for name, src, kind, metric in rows
    )
    sections = ", ".join(f"`{s}`" for s in ANALOGY_SECTIONS)
    answer_chars = f"{CODE_MIN_ANSWER}-{CODE_MAX_ANSWER}"
    return f"""# Quickstart task stream (offline, real text)

Four small tasks in the TRACE layout (`<Task>/{{train,eval,test}}.json`, each a JSON list of
`{{"prompt", "answer"}}`), built from human-written text that ships inside Debian and PyPI
packages, so the stream needs no network. Sizes are train / eval / test. Prompts are raw text
(no chat template) and end in a `...:` cue; answers are a few tokens and carry no leading space
(the trainer tokenizes prompt and answer separately). Prompts stay at or under 60 SmolLM2 tokens:
the builder needs no tokenizer, it bounds a tokenizer-free piece count (`approx_tokens`), and the
last column gives the longest prompt over all splits as measured with the SmolLM2-135M-Instruct
tokenizer (`tokenizer(prompt)`, as the trainer calls it) when the files were built.

**Do not edit by hand.** Everything here is written by `tools/build_quickstart_data.py`
(seeded, sorted inputs; `--check` verifies the committed files reproduce byte for byte).

| Task | Source | Kind | Metric | Sizes | Max prompt tokens |
|---|---|---|---|---|---|
{table}

## FortuneTopic

Entries of `/usr/share/games/fortunes/{{{",".join(FORTUNE_TOPICS)}}}` (package `fortunes`,
separated by `%` lines), whitespace collapsed to single spaces, {FORTUNE_MIN_CHARS}-{FORTUNE_MAX_CHARS}
characters, deduplicated, and dropped when the same text sits in two of the chosen files. Usable
entries per topic: {info["FortuneTopic"]["pool_sizes"]}. Each topic gives exactly
{FORTUNE_PER_TOPIC[0]} / {FORTUNE_PER_TOPIC[1]} / {FORTUNE_PER_TOPIC[2]} examples, so classes are balanced.
Only the non-offensive `fortunes` package is used (never `fortunes-off`).

- Labels: {", ".join(f"`{t}`" for t in FORTUNE_TOPICS)} (the answer is the file name).
- Test label counts: {dict(sorted(label_counts.items()))}.
- Majority-class baseline on test (most common training label, `{top}`): **{base:.3f}**.
- Config: `classification: true`, `metric: exact_match`.

{example("FortuneTopic")}

## WordAnalogy

`gensim/test/test_data/questions-words.txt` read from inside the gensim {v["gensim"]} wheel
(`pip download gensim=={v["gensim"]} --no-deps`; not installed; sha256 `{a["sha256"][:16]}...`),
the Mikolov et al. (2013) word2vec analogy set. Sections used: {sections}.

The file recombines the same word pairs, so the split is by **answer pair**: within each section the
pairs' answer words (second word, case-folded) are shuffled and assigned 60% train / 10% eval /
30% test (answer words per split: {a["answer_words_per_split"]}). Training examples use two training
pairs; an eval/test example asks for an eval/test pair `(c, d)` with a training pair `(a, b)` as the
demonstration. So no eval/test answer pair occurs in any training example (as `(a, b)` or `(c, d)`),
and no eval/test answer word is a training answer: test measures generalisation of the relation
(morphology, capitals, gender, nationality), not recall of seen pairs. Examples rotate over
sections and answer pairs for balance.

{example("WordAnalogy")}

## WordNetDefWord

`/usr/share/wordnet/data.noun` (package `wordnet-base`, WordNet 3.0). For each noun synset whose
first lemma is a lower-case ASCII word of {WORDNET_MIN_LEMMA}-{WORDNET_MAX_LEMMA} letters: the definition is
the gloss part after `|` up to the first `;`, kept when 10-{WORDNET_MAX_GLOSS} characters long, with no
quoted example and not containing the word (or its stem). Each word keeps its most frequent sense
(sense-tagged count from `cntlist.rev`), and the {N_TRAIN + N_EVAL + N_TEST} most frequent words are
shuffled into the splits. Each word is the answer of exactly one example, so no test answer occurs
as a training answer. Metric `exact_match` (case-sensitive, after stripping; all answers are lower
case). `rouge_l` would give the same score for one-word answers except for partial credit on
multi-word outputs, so exact match is the plainer choice; expect low absolute scores from a 135M
model, which is fine for measuring forgetting.

{example("WordNetDefWord")}

## PyNextLine

The `.py` files of the running interpreter's standard library (`sysconfig.get_paths()["stdlib"]`,
CPython {v["python"]}), without the {", ".join(sorted(CODE_SKIP_DIRS))} folders. Files are shuffled and
split 60% / 10% / 30% by **file** into train / eval / test ({c["files"]} files; files used:
{c["used_files"]}), so test code never comes from a training file. `PyNextLine/sources.json` lists
the source file of every example, split by split, in the same order as the split files.

Per file, lines that hold code are kept (no blank lines, comment-only lines, lines inside multi-line
strings such as docstrings, or lines with tabs). An example is {CODE_CONTEXT_LINES} consecutive code lines
(at most two blank/comment lines between them) as context, common indentation removed
(`textwrap.dedent`, relative indentation kept), at most {CODE_MAX_CONTEXT_CHARS} characters, and the next
code line as the answer, **stripped of its indentation**, {answer_chars} characters, not a
`def`/`class`/decorator line and not a repeat of a context line. At most {CODE_PER_FILE} examples per file.
Metric `edit_similarity` (TRACE's Py150 metric).

{example("PyNextLine")}

## Rebuilding

```
apt-get install fortunes wordnet-base
pip download gensim=={v["gensim"]} --no-deps -d /tmp/gensim
python tools/build_quickstart_data.py          # writes data/quickstart/
python tools/build_quickstart_data.py --check  # exit 1 if the committed files differ
```

Built with: fortunes {v["fortunes"]}, wordnet-base {v["wordnet-base"]} (Debian 12), gensim {v["gensim"]},
CPython {v["python"]}, seed {SEED}. Other versions can give different files (the builder warns).

## Licences

- **fortunes** (fortune-mod data, Debian `main`): BSD licence of fortune-mod, see
  `/usr/share/doc/fortunes/copyright`. The quotations are attributed to their authors in the text.
- **questions-words.txt**: from Google's word2vec release (Apache-2.0), redistributed in gensim
  (LGPL-2.1-only).
- **WordNet 3.0**: WordNet 3.0 licence (permissive, with notice). As that licence requires:
  "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND
  DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES,
  EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
  REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT
  THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY
  PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS." The name of Princeton University may not be
  used in advertising or publicity pertaining to distribution of the database.
- **CPython standard library**: Python Software Foundation License 2.
"""


def build(gensim_wheel: str | None) -> dict[str, str]:
    """All output files, relative path -> text."""
    versions = {"python": ".".join(map(str, sys.version_info[:3])), "gensim": BUILT_WITH["gensim"]}
    for pkg in ("fortunes", "wordnet-base"):
        versions[pkg] = dpkg_version(pkg) or "unknown"
    wheel = find_gensim_wheel(gensim_wheel)
    m = re.match(r"gensim-([^-]+)-", wheel.name)
    if m:
        versions["gensim"] = m.group(1)
    for key, want in BUILT_WITH.items():
        if versions[key] != want:
            print(
                f"warning: {key} is {versions[key]}, the committed files were built with {want}",
                file=sys.stderr,
            )

    tasks, info = {}, {"versions": versions}
    tasks["FortuneTopic"], info["FortuneTopic"] = build_fortunes()
    tasks["WordAnalogy"], info["WordAnalogy"] = build_analogies(wheel)
    tasks["WordNetDefWord"], info["WordNetDefWord"] = build_definitions()
    tasks["PyNextLine"], sources, info["PyNextLine"] = build_code()

    files = {}
    for name, splits in tasks.items():
        for split in ("train", "eval", "test"):
            files[f"{name}/{split}.json"] = dumps(splits[split])
    files["PyNextLine/sources.json"] = dumps(sources)
    files["README.md"] = readme(tasks, info)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: data/quickstart)")
    ap.add_argument("--gensim-wheel", help="path to the gensim wheel (default: /tmp/gensim/gensim-*.whl)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    files = build(args.gensim_wheel)
    return check_or_write(files, out, args.check)


def check_or_write(files: dict[str, str], out: Path, check: bool) -> int:
    """Write the built files under `out`, or with `check` compare them with what is there (exit 1
    when any differs). tools/build_general_data.py uses it too."""
    if check:
        stale = [
            rel
            for rel, text in files.items()
            if not (out / rel).is_file() or (out / rel).read_text(encoding="utf-8") != text
        ]
        for rel in stale:
            print(f"differs: {out / rel}")
        print("up to date" if not stale else f"{len(stale)} file(s) differ")
        return 1 if stale else 0
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
