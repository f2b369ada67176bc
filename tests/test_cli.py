"""The ``tiercache`` command: --help and --version, inspect, batch on a tiny jobs file, a short
demo, any checkpoint on disk through --model (a tiny random Llama), errors as exit code 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiercache.cli import main
from tiercache.evaluation import FACTS, plant_facts, question_text
from tiercache.io.codec import make_codec
from tiercache.contexts.kv import save_kv_context
from tiercache.io.store import DiskStore
from helpers import read_answers, save_tiny_checkpoint, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [[], ["demo"], ["inspect"], ["batch"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: tiercache" in out
    if command in (["demo"], ["batch"]):
        for option in ("--model PATH_OR_DIR", "--device", "--dtype", "--threads", "--max-new-tokens",
                       "--stop"):
            assert option in out


def test_help_and_bad_options_import_neither_torch_nor_transformers():
    """The parser is built without torch (its import takes seconds), so --help and bad options
    answer at once; the command modules import what they need when they run."""
    code = ("import sys\n"
            "from tiercache.cli import main\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['demo', '--budget', '-1'],\n"
            "             ['batch', 'j', '--out', 'o', '--max-tokens', '-5'],\n"
            "             ['demo', '--model', '/nowhere']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_the_package_names_resolve_on_first_use():
    """``import tiercache`` imports no torch; each public name is imported when first used."""
    import tiercache

    for name in tiercache.__all__:
        assert getattr(tiercache, name).__name__ == name


def test_dtype_choices_are_the_configs_dtypes():
    from tiercache.cli.options import DTYPE_NAMES
    from tiercache.config import DTYPES

    assert DTYPE_NAMES == tuple(sorted(DTYPES))


def test_version(capsys):
    import tiercache

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"tiercache {tiercache.__version__} (torch ")


def test_inspect_a_small_store(tmp_path, capsys, fingerprint_for):
    kv = torch.randn(2, 2, 3, 300, 64)
    zstd, quant = make_codec("zstd"), make_codec("quant", bits=4)
    with DiskStore(tmp_path, 64 << 20, sync=False) as store:
        save_kv_context(store, "doc-a", kv, zstd, fingerprint_for(kv, zstd))
        save_kv_context(store, "doc-b", kv[:, :, :, :100], quant, fingerprint_for(kv, quant))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 contexts, 0 blocks" in out
    assert "doc-a" in out and "codec zstd" in out and "codec quant" in out
    assert "records" in out and "segment seg-" in out


def test_errors_exit_with_code_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "tiercache: error:" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2  # a directory without a store
    assert "no tiercache disk store" in capsys.readouterr().err


@pytest.mark.model
def test_batch_on_a_tiny_jobs_file(smollm2, tmp_path, capsys):
    _, tok = smollm2
    from tiercache.corpus import text_tokens

    document = tok.decode(plant_facts(tok, text_tokens(tok, 300, offset_tokens=8000), FACTS[:1]))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"document": document, "questions": [question_text(FACTS[0])]}) + "\nnot json\n")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(jobs), "--out", str(out), "--store", str(tmp_path / "store"), "--codec", "zstd",
            "--max-new-tokens", "10"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"{jobs}:2: skipped: bad JSON" in captured.err
    # The progress bar (stderr) shows answer tokens/s and the stored-context and device hit rates.
    assert "answering" in captured.err and "tok/s=" in captured.err and "ctx hit=0/1" in captured.err
    # The bar's device hit rate is the run's, as the summary gives it (not 0 until a document ends).
    bar_rate = re.findall(r"dev hit=([0-9.]+)", captured.err)[-1]
    assert f"device hit rate {bar_rate};" in captured.out and float(bar_rate) > 0, captured.err[-300:]
    assert "answered 1 questions" in captured.out and "prefill time saved" in captured.out
    [record] = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["line"] == 1
    assert record["answer"] == f"{FACTS[0].answer}.", "the answer ends with its sentence"
    args.append("--quiet")
    assert main(args) == 0  # a rerun answers nothing again
    assert "answered 0 questions (1 already answered before)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert "context store: 1 documents" in capsys.readouterr().out


@pytest.mark.model
def test_demo_quick(smollm2, tmp_path, capsys):
    store = tmp_path / "demo"
    assert main(["demo", "--tokens", "300", "--max-new-tokens", "4", "--store", str(store)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "accuracy: tiercache" in out and "full attention" in out
    for word in ("device", "host", "disk codec cachegen", "device hit rate", "tokens/s"):
        assert word in out
    assert "legend: ok = the answer contains the expected word, -- = it does not" in out
    # Progress bars (stderr) for appending, asking and the reference.
    for bar in ("appending: 100%", "asking tiercache: 100%", "full attention: 100%"):
        assert bar in captured.err
    # Cells wrap instead of being cut: every question appears whole, split over lines at spaces.
    table = out[out.index("question") : out.index("accuracy:")]
    words = " ".join(line[:34].strip() for line in table.splitlines()[1:])
    assert all(fact.question in words for fact in FACTS), table
    assert f"tiercache inspect {store}" in out
    assert main(["inspect", str(store)]) == 0
    assert "stream session: model SmolLM2-135M-Instruct, " in capsys.readouterr().out


def test_demo_store_must_not_hold_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--store", str(tmp_path)]) == 2
    assert "is not empty and holds no tiercache store" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def tiny_llama(smollm2, tmp_path_factory):
    """A randomly initialised 2-layer Llama saved with SmolLM2's tokenizer: any checkpoint on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.model
def test_any_checkpoint_on_disk_runs_demo_batch_and_inspect(tiny_llama, tmp_path, capsys):
    store = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_llama), "--tokens", "200", "--max-new-tokens", "3",
                 "--store", str(store), "--dtype", "float32", "--device", "cpu", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert f"loading {tiny_llama} on cpu as float32, 1 torch thread(s)" in captured.err
    assert "accuracy: tiercache" in captured.out
    assert main(["inspect", str(store), "--model", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    assert f"stream session: model {tiny_llama.name}" in out and f"reopens with {tiny_llama.name}: yes" in out
    assert f"loads into {tiny_llama.name}: yes" in out
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"document": "The vault code is 58203. " * 8,
                                "questions": ["The vault code is"]}))
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(jobs), "--out", str(out), "--store", str(tmp_path / "contexts"), "--codec",
                 "zstd", "--model", str(tiny_llama), "--max-new-tokens", "3", "--stop", "", "--quiet"]) == 0
    assert "answered 1 questions" in capsys.readouterr().out
    [record] = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["question"] == "The vault code is" and isinstance(record["answer"], str)


@pytest.mark.model
def test_inspect_says_when_a_context_does_not_fit_a_model(tiny_llama, smollm2, tmp_path, capsys,
                                                          fingerprint_for):
    from tiercache.models import default_model_dir

    kv, zstd = torch.randn(2, 2, 2, 40, 16), make_codec("zstd")
    with DiskStore(tmp_path, 64 << 20, sync=False) as store:
        save_kv_context(store, "ctx", kv, zstd, fingerprint_for(kv, zstd))
    assert main(["inspect", str(tmp_path), "--model", str(tiny_llama)]) == 0
    assert f"loads into {tiny_llama.name}: yes" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--model", str(default_model_dir())]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    assert ("loads into SmolLM2-135M-Instruct: no: it holds 2 layers x 2 KV heads x 16 dims, the model has "
            "30 x 3 x 64") in " ".join(out.split()), "inspect wraps its lines at 100 columns"


#: Bad arguments, each refused by the parser with what it says (before anything loads).
BAD_ARGUMENTS = {
    ("demo", "--model", "{tmp}/missing"): "is not a directory",
    ("batch", "jobs.jsonl", "--out", "a", "--model", "{tmp}"): "holds no config.json",
    ("demo", "--threads", "0"): "must be >= 1, got 0",
    ("batch", "j", "--out", "o", "--max-new-tokens", "0"): "must be >= 1, got 0",
    ("batch", "j", "--out", "o", "--max-tokens", "-5"): "must be >= 1, got -5",
    ("demo", "--budget", "-1"): "a token count must be >= 1, got -1",
    ("demo", "--budget", "1.5"): "a fraction must be in (0, 1], got 1.5",
    ("batch", "j", "--out", "o", "--budget", "half"): "not a fraction or a token count: 'half'",
    ("demo", "--dtype", "int8"): "invalid choice: 'int8'",
    ("batch", "j", "--out", "o", "--codec", "gzip"): "invalid choice: 'gzip'",
}


@pytest.mark.parametrize("argv", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_by_the_parser(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit.value.code == 2
    assert BAD_ARGUMENTS[argv] in capsys.readouterr().err


def test_budget_help_says_it_takes_a_fraction_or_a_token_count(capsys):
    for command in ("demo", "batch"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "a fraction of the" in " ".join(capsys.readouterr().out.split())


def test_a_device_this_machine_lacks_is_refused_in_the_options_terms(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "tiercache: error: --device 'cuda' is not available" in err
    assert "use --device cpu, or leave --device out" in err and "device='cpu'" not in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved with a tokenizer built here."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", tiny_tokenizer())


def test_ctrl_c_keeps_the_answers_and_prints_the_command_that_resumes(tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    import tiercache.jobs as jobs

    jobs_file, out = tmp_path / "jobs.jsonl", tmp_path / "answers.jsonl"
    jobs_file.write_text(json.dumps({"document": "The vault code is 58203. " * 4,
                                     "questions": ["a", "b", "c"]}))
    argv = ["batch", str(jobs_file), "--out", str(out), "--store", str(tmp_path / "store"), "--model",
            str(tiny_checkpoint), "--max-new-tokens", "2", "--quiet"]
    append = jobs.append_answer

    def interrupted_after_it(sink, record):
        append(sink, record)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(jobs, "append_answer", interrupted_after_it)
        assert main(argv) == 130
    err = capsys.readouterr().err
    command = shlex.join(["tiercache", *argv])
    assert err.rstrip().splitlines()[-1] == (f"tiercache: interrupted; 1 answers are in {out}, and this "
                                             f"resumes the run: {command}")
    assert "Traceback" not in err
    assert main(shlex.split(command)[1:]) == 0
    assert "answered 2 questions (1 already answered before)" in capsys.readouterr().out
    # With every question answered, no model loads (nor does a Ray cluster start).
    monkeypatch.setattr("tiercache.cli.options.load", lambda args: pytest.fail("a model was loaded"))
    for extra in ([], ["--ray"]):
        assert main(argv + extra) == 0
        assert capsys.readouterr().out.splitlines() == [
            "answered 0 questions (3 already answered before); 0 bad job lines skipped",
            "nothing left to answer: no model was loaded"]


def test_ctrl_c_inside_a_forward_is_reported_as_the_interruption(tiny_checkpoint):
    """A KeyboardInterrupt between two layers of a forward leaves the layers at different lengths;
    ask_cache cannot truncate the question away then, and must not hide the interruption behind
    that refusal."""
    from tiercache.generation import ask_cache
    from tiercache.hf.cache import TieredCache
    from tiercache.models import load_model
    from helpers import tiered_config

    model, tok = load_model(tiny_checkpoint)
    cache = TieredCache(model, tiered_config(model))
    with torch.no_grad():
        model(torch.tensor([tok("The vault code is 58203. " * 3)["input_ids"]]), past_key_values=cache)
    calls = []

    def interrupt_in_the_second_forward(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.model.layers[1].register_forward_pre_hook(interrupt_in_the_second_forward)
    with pytest.raises(KeyboardInterrupt):
        ask_cache(model, tok, cache, "The vault code is", max_new_tokens=4, stop=None)
    cache.close()


def test_ctrl_c_on_a_running_batch_command(tiny_checkpoint, tmp_path):
    """SIGINT to the command itself, while it answers: exit code 130, the answers written so far
    kept whole, and the last line of stderr the one-line message with the command that resumes."""
    import signal
    import time

    jobs_file, out = tmp_path / "jobs.jsonl", tmp_path / "answers.jsonl"
    jobs_file.write_text(json.dumps({"document": "The vault code is 58203. " * 20,
                                     "questions": [f"question {i}" for i in range(2000)]}))
    argv = ["batch", str(jobs_file), "--out", str(out), "--store", str(tmp_path / "store"), "--model",
            str(tiny_checkpoint), "--max-new-tokens", "8", "--stop", ""]
    proc = subprocess.Popen([sys.executable, "-m", "tiercache.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (out.exists() and len(out.read_bytes().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    kept = read_answers(out)
    assert err.replace("\r", "\n").rstrip().splitlines()[-1] == (
        f"tiercache: interrupted; {len(kept)} answers are in {out}, and this resumes the run: "
        f"{shlex.join(['tiercache', *argv])}")
