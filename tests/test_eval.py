"""eval.py: sliding-window perplexity against the transformers guide's loop, LAMBADA against a brute-force
computation, the lm-evaluation-harness wrapper against direct computations and on local task YAMLs,
and the command line on a training out_dir and an HF folder. All offline, on a tiny random GPT-2."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import eval as ev
import tokenizer
from errors import UserError
import hf_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "eval")
WIKI, LAMBADA, IMDB = (os.path.join(FIXTURES, f) for f in ("wikitext2.jsonl", "lambada.jsonl", "imdb.jsonl"))
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def hf(base_bpe):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(base_bpe).eval()


@pytest.fixture(scope="module")
def ours(base_bpe):
    return hf_gpt2.load(base_bpe).eval()


def run(*args, env=None):
    return subprocess.run([sys.executable, "eval.py", "--device=cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, **OFFLINE, **(env or {})))


def guide_perplexity(hf, ids, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity on transformers' GPT2LMHeadModel:
    labels -100 on the overlap with the previous window. The guide weights each window's mean loss by
    (valid labels - batch size); we count the labels that are really scored (after the shift)."""
    ids = torch.tensor(ids)[None]  # (1, N)
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def wiki_ids():
    return ev.load_dataset(f"wikitext2={WIKI}")["docs"][0]


# -----------------------------------------------------------------------------
# perplexity

def test_sliding_windows_score_every_token_once():
    """stride < window: every token but the first, once; stride == window: disjoint windows whose
    first token is context only."""
    for n, w, s in [(10, 4, 2), (10, 4, 4), (11, 4, 3), (3, 8, 4), (100, 64, 1), (65, 64, 32), (130, 64, 64)]:
        scored = [i for _, e, f in ev.sliding_windows(n, w, s) for i in range(f, e)]
        assert scored == [i for i in range(1, n) if s < w or i % w], (n, w, s)
        assert all(e - b <= w for b, e, _ in ev.sliding_windows(n, w, s))


@pytest.mark.parametrize("block_size,stride", [(64, 16), (64, 32), (64, 64), (40, 13)])
def test_perplexity_equals_the_transformers_guide(hf, ours, block_size, stride):
    ids = wiki_ids()
    assert len(ids) > 3 * block_size  # several windows, the last one partial
    expected, n_tokens = guide_perplexity(hf, ids.tolist(), block_size, stride)
    got = ev.perplexity(ours, [ids], block_size, stride, batch_size=3)
    assert got["tokens"] == n_tokens == len(ids) - 1 - (stride == block_size) * ((len(ids) - 1) // block_size)
    assert got["ppl"] == pytest.approx(expected, rel=1e-4)


def test_perplexity_of_a_text_shorter_than_the_context_is_exp_mean_loss(hf, ours):
    ids = wiki_ids()[:50]
    with torch.no_grad():
        loss = hf(torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss.item()
    got = ev.perplexity(ours, [ids], 64, 32)
    assert got["windows"] == 1 and got["tokens"] == 49
    assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_imdb_documents_are_scored_one_by_one_after_eot(hf, ours):
    ds = ev.load_dataset(f"imdb={IMDB}", max_docs=4)
    texts = [json.loads(line)["text"] for line in open(IMDB)]
    assert ds["records"] == 6 and len(ds["docs"]) == 4  # evenly spaced: reviews 0, 1, 3, 4, both labels
    assert [d.tolist() for d in ds["docs"]] == [[tokenizer.EOT] + tokenizer.encode(texts[i]) for i in (0, 1, 3, 4)]
    total, count = 0.0, 0
    for doc in ds["docs"]:  # each shorter than the context: one forward pass per review
        with torch.no_grad():
            x = torch.tensor(doc)[None]
            total += hf(x, labels=x).loss.item() * (len(doc) - 1)
        count += len(doc) - 1
    got = ev.perplexity(ours, ds["docs"], 64, 32, batch_size=3)
    assert got["tokens"] == count
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_wikitext_fixture_is_joined_as_the_guide_does():
    records = [json.loads(line)["text"] for line in open(WIKI)]
    assert "" in records and any(re.fullmatch(r" = .* = \n", t) for t in records)  # the real file's shape
    assert wiki_ids().tolist() == tokenizer.encode("\n\n".join(records))


# -----------------------------------------------------------------------------
# LAMBADA

def brute_force_lambada(hf, texts, block_size):
    """Per passage, one forward pass of transformers' model over context + target."""
    nlls, correct = [], []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        ctx = tokenizer.encode(context)
        tgt = tokenizer.encode(context + " " + word)[len(ctx):]
        seq = (ctx + tgt)[-(block_size + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor(seq[:-1])[None]).logits[0]  # (T, V)
        logp = torch.log_softmax(logits.double(), dim=-1)[-len(tgt):]  # the target positions
        nlls.append(-sum(logp[j, t].item() for j, t in enumerate(tgt)))
        correct.append(all(logp[j].argmax().item() == t for j, t in enumerate(tgt)))
    return nlls, correct


def greedy_passages(ours, contexts):
    """Passages whose last word is the model's own greedy next token (a single ' word' token), so a
    random model gets some LAMBADA examples right."""
    out = []
    for context in contexts:
        with torch.no_grad():
            logits, _ = ours(torch.tensor(tokenizer.encode(context))[None])
        token = logits[0, -1].argmax().item()
        word = tokenizer.decode([token])
        if re.fullmatch(r" [A-Za-z]+", word) and tokenizer.encode(context + word)[-1:] == [token]:
            out.append(context + word)
    return out


def test_lambada_accuracy_and_perplexity_equal_brute_force(hf, ours, tmp_path):
    texts = [json.loads(line)["text"] for line in open(LAMBADA)]
    contexts = [t.rsplit(" ", 1)[0] for t in texts]
    right = greedy_passages(ours, contexts + [c + " and then" for c in contexts])
    assert right, "no passage whose greedy next token is a word"
    long = " ".join(texts[:3])  # ~120 tokens: the context is cut from the left to the last 64
    all_texts = texts + right + [long]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in all_texts))
    ds = ev.load_dataset(f"lambada={path}")
    assert ds["kind"] == "lambada" and len(ds["examples"]) == len(all_texts)
    got = ev.lambada(ours, ds["examples"], 64, batch_size=5)
    nlls, correct = brute_force_lambada(hf, all_texts, 64)
    assert 0 < got["acc"] < 1
    assert got["acc"] == sum(correct) / len(correct)
    assert got["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert all(correct[len(texts):len(texts) + len(right)])


# -----------------------------------------------------------------------------
# lm-evaluation-harness wrapper

def requests(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def direct_loglikelihood(hf, context_ids, cont_ids):
    with torch.no_grad():
        logits = hf(torch.tensor(context_ids + cont_ids[:-1])[None]).logits[0]  # (T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)[-len(cont_ids):]
    return sum(logp[j, t].item() for j, t in enumerate(cont_ids)), all(
        logp[j].argmax().item() == t for j, t in enumerate(cont_ids))


def test_harness_loglikelihood_equals_a_direct_computation(hf, ours):
    lm = ev.harness_lm(ours, batch_size=2)
    pairs = [("The keeper climbed the steps", " and lit the lamp"),
             ("Question: what is two plus two?\nAnswer: ", "four"),  # the trailing space moves to the continuation
             ("", "Hello world"),  # empty context: <|endoftext|>
             ("A", " B")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    expected = [
        direct_loglikelihood(hf, tokenizer.encode(pairs[0][0]), tokenizer.encode(pairs[0][1])),
        direct_loglikelihood(hf, tokenizer.encode("Question: what is two plus two?\nAnswer:"), tokenizer.encode(" four")),
        direct_loglikelihood(hf, [tokenizer.EOT], tokenizer.encode("Hello world")),
        direct_loglikelihood(hf, tokenizer.encode("A"), tokenizer.encode(" B")),
    ]
    for (lp, greedy), (lp_ref, greedy_ref) in zip(got, expected):
        assert lp == pytest.approx(lp_ref, rel=1e-5) and greedy == greedy_ref
    # the LAMBADA metric and the harness agree on a passage
    text = json.loads(open(LAMBADA).readline())["text"]
    context, word = text.rsplit(" ", 1)
    (lp, _), = lm.loglikelihood(requests("loglikelihood", [(context, " " + word)]))
    assert -lp == pytest.approx(ev.lambada(ours, [ev.lambada_example(text, "x")], 64)["nll"], rel=1e-6)


def test_harness_loglikelihood_rolling_equals_sliding_window_nll(ours):
    lm = ev.harness_lm(ours, batch_size=3)
    words = " the cat sat on a mat and then it ran to the door of my house".split(" ")[1:]
    text = "".join(" " + words[i % len(words)] for i in range(128))[1:]  # "the cat sat ...": 128 tokens
    ids = tokenizer.encode(text)
    assert len(ids) == 2 * 64
    short = "The lamp was lit at dusk."
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    # lm-eval's rolling windows: <|endoftext|> first, disjoint windows of 64 predictions, each with a
    # full window of context: the sliding window of 65 tokens with stride 64 over [EOT] + text
    doc = torch.tensor([tokenizer.EOT] + ids).numpy()
    r = ev.perplexity(ours, [doc], 65, 64)
    assert r["tokens"] == 128
    assert -got[0] == pytest.approx(r["nll"] * r["tokens"], rel=1e-5)
    doc = torch.tensor([tokenizer.EOT] + tokenizer.encode(short)).numpy()
    r = ev.perplexity(ours, [doc], 64, 64)
    assert -got[1] == pytest.approx(r["nll"] * r["tokens"], rel=1e-5)


def test_harness_generate_until_is_greedy_and_stops(ours):
    lm = ev.harness_lm(ours)
    context = "Once upon a time"
    x = torch.tensor(tokenizer.encode(context))[None]
    greedy = tokenizer.decode(ours.generate(x, 12, temperature=0)[0, x.size(1):].tolist())
    stop = greedy[5:7]  # a stop string inside the greedy continuation
    out = lm.generate_until(requests("generate_until", [
        (context, {"until": [], "max_gen_toks": 12, "do_sample": False}),
        (context, {"until": [stop], "max_gen_toks": 12}),
    ]))
    assert out[0] == greedy
    assert out[1] == greedy.split(stop)[0] and len(out[1]) < len(greedy)


# -----------------------------------------------------------------------------
# the command line

def test_cli_on_an_adapter_out_dir_and_an_hf_folder(base_bpe, data, ours, tmp_path):
    out_dir = tmp_path / "lora"
    p = subprocess.run([sys.executable, "train.py", f"--init_from={base_bpe}", f"--dataset={data}",
                        f"--out_dir={out_dir}", "--method=lora", "--targets=lora4", "--block_size=32",
                        "--batch_size=2", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
                        "--learning_rate=1e-2", "--warmup_iters=0", "--device=cpu", "--compile=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    result = tmp_path / "results.json"
    p = run(f"--models={out_dir},{base_bpe}", f"--datasets=wikitext2={WIKI},lambada={LAMBADA},imdb={IMDB},valbin={data}",
            f"--out={result}", "--batch_size=3")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = "| model | wikitext2 ppl | lambada acc | lambada ppl | imdb ppl | valbin ppl |"
    assert header in lines
    rows = lines[lines.index(header) + 2:lines.index(header) + 4]
    assert [r.split(" | ")[0] for r in rows] == [f"| {out_dir}", f"| {base_bpe}"]
    assert "different contexts" in p.stdout  # the adapter run was trained (and cropped) to 32 positions
    res = json.loads(result.read_text())
    assert [m["model"] for m in res["models"]] == [str(out_dir), base_bpe]
    lora, base = res["models"]
    assert lora["method"] == "lora" and (lora["block_size"], lora["stride"]) == (32, 16)
    assert set(lora["datasets"]) == {"wikitext2", "lambada", "imdb", "valbin"}
    assert res["datasets"]["lambada"]["records"] == 12

    # the adapter evaluated unmerged, in this process, gives the number eval.py got from the merged model
    model, meta = checkpoint.load_model(str(out_dir))
    assert meta is not None and any("lora" in n for n, _ in model.named_parameters())
    unmerged = ev.perplexity(model, [wiki_ids()], 32, 16)
    assert unmerged["ppl"] == pytest.approx(lora["datasets"]["wikitext2"]["ppl"], rel=1e-5)
    assert unmerged["ppl"] != pytest.approx(ev.perplexity(ours, [wiki_ids()], 32, 16)["ppl"], rel=1e-4)  # it trained
    assert base["datasets"]["wikitext2"]["ppl"] == pytest.approx(ev.perplexity(ours, [wiki_ids()], 64, 32)["ppl"], rel=1e-5)


TASKS = {
    "tiny_mc": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tiny_gen": """
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}


def test_harness_on_local_task_yamls(base_bpe, tmp_path):
    docs = [{"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
            {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
            {"question": "Which is the largest?", "choices": ["a mouse", "a dog", "an elephant"], "answer": 2},
            {"question": "What do bees make?", "choices": ["honey", "milk", "bread"], "answer": 0}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(head + body.lstrip())
    result = tmp_path / "harness.json"
    env = dict(HF_HOME=str(tmp_path / "hf_home"))
    p = run(f"--models={base_bpe}", "--tasks=tiny_mc,tiny_gen,tiny_rolling", f"--include_path={tasks}",
            "--limit=3", f"--out={result}", "--bootstrap_iters=0", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(result.read_text())["models"][0]
    assert set(res["datasets"]) == set()  # --tasks alone: no perplexity datasets
    results = res["tasks"]["results"]
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["tiny_gen"]["exact_match,none"] <= 1
    assert results["tiny_rolling"]["word_perplexity,none"] > 1
    assert res["tasks"]["n-samples"]["tiny_mc"]["effective"] == 3
    header = "| model | tiny_mc acc | tiny_gen exact_match | tiny_rolling word_perplexity | tiny_rolling bits_per_byte |"
    assert header in p.stdout.splitlines()

    p = run(f"--models={base_bpe}", "--tasks=tiny_mcc", f"--include_path={tasks}", env=env)
    assert p.returncode == 2
    error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "tiny_mcc" in error[0] and "tiny_mc" in error[0].split("did you mean")[1]
    assert p.stderr.strip().splitlines()[-1] == error[0]


# -----------------------------------------------------------------------------
# bad input: one line, exit 2

def one_line_error(p):
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_bad_input_stops_with_one_line(base_bpe, tmp_path):
    model = f"--models={base_bpe}"
    err = one_line_error(run(model, "--datasets=wikitext"))
    assert "unknown dataset 'wikitext'" in err and "wikitext2" in err and "lambada" in err and "imdb" in err

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "fine passage here"}) + "\n" + json.dumps({"sentence": "no text"}) + "\n")
    err = one_line_error(run(model, f"--datasets=lambada={wrong}"))
    assert str(wrong) in err and "record 1" in err and "'text'" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = one_line_error(run(model, f"--datasets=wikitext2={empty}"))
    assert "no records" in err

    err = one_line_error(run(model, "--datasets=wikitext2", env=dict(HF_HOME=str(tmp_path / "hf_home"))))
    assert "Hugging Face Hub" in err and "--datasets=wikitext2=" in err

    err = one_line_error(run(model, f"--datasets=wikitext2={WIKI}", "--block_size=65"))
    assert "--block_size=65" in err and "64" in err


def test_load_dataset_errors_in_process(tmp_path):
    no_space = tmp_path / "l.jsonl"
    no_space.write_text(json.dumps({"text": "word"}) + "\n")
    with pytest.raises(UserError, match="record 0 has no space"):
        ev.load_dataset(f"lambada={no_space}")
    with pytest.raises(UserError, match="only stand for"):
        ev.load_dataset(f"mine={no_space}")
    assert ev.evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert ev.evenly_spaced(list(range(3)), 0) == [0, 1, 2]
