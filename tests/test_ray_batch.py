"""``tiercache batch --ray`` on a local Ray cluster of 2 workers sharing a Redis context tier:
4 documents x 3 questions (and a bad line). The driver is killed with SIGKILL mid-run and run
again: no answered question is redone, each document's prefill happens once across the cluster
and both runs, each worker loads the model once, and the answers equal the single-process
run's. Slow (two Ray clusters, four model loads): ``make test`` runs it after the default run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis
import torch

from tiercache.cli import main
from tiercache.corpus import text_tokens
from helpers import read_answers

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.ray]

QUESTIONS = ["\nQuestion: what is this text about? Answer:", "\nThe first word of the text is",
             "\nIn one word, the topic is"]


def test_ray_batch_resumes_after_the_driver_is_killed_and_equals_one_process(smollm2, redis_url, tmp_path,
                                                                            capsys):
    _, tok = smollm2
    jobs = tmp_path / "jobs.jsonl"
    lines = [json.dumps({"document": tok.decode(text_tokens(tok, 80, offset_tokens=1000 + 500 * i)),
                         "questions": QUESTIONS}) for i in range(4)]
    lines.insert(2, '{"document": "no questions"}')
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(jobs), "--out", str(out), "--store", redis_url, "--codec", "zstd",
            "--max-new-tokens", "3", "--threads", "1", "--quiet"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "tiercache.cli", *args, "--ray", "--workers", "2"]

    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cluster = []
    try:
        deadline = time.monotonic() + 300
        while (not out.exists() or out.read_bytes().count(b"\n") < 4) and time.monotonic() < deadline:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        cluster = psutil.Process(driver.pid).children(recursive=True)  # the local Ray cluster it started
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
        for p in cluster:  # the machine the driver ran on is gone too
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(cluster, timeout=30)
    before = out.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    done = kept.count(b"\n")
    assert 4 <= done < 12, "killed mid-run"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{jobs}:3: skipped: " in rerun.stderr and '"questions"' in rerun.stderr
    assert f"answered {12 - done} questions ({done} already answered before); 1 bad job lines skipped" \
        in rerun.stdout, rerun.stdout
    assert ", 0 found stored" not in rerun.stdout, "a document the killed run stored is loaded, not encoded"
    workers = [line for line in rerun.stdout.splitlines() if line.startswith("ray worker pid")]
    assert len(workers) == 2 and len({w.split()[3] for w in workers}) == 2, rerun.stdout
    assert all(": 1 model load(s)," in w for w in workers), "each worker loads the model once"
    after = out.read_bytes()
    assert after.startswith(kept), "answers written before the kill stay as they were"
    got = read_answers(out)
    assert len({(r["job"], r["index"]) for r in got}) == len(got) == 12, "each answer written exactly once"
    stats = redis.Redis.from_url(redis_url).hgetall("tiercache:stats")
    assert int(stats[b"saves"]) == 4, "each document stored once, over the cluster and both runs"

    threads = torch.get_num_threads()
    single = tmp_path / "one-process.jsonl"
    try:
        capsys.readouterr()
        assert main(["batch", str(jobs), "--out", str(single), "--store", str(tmp_path / "one-process"),
                     *args[6:]]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "documents: 4 encoded" in capsys.readouterr().out
    by_key = {(r["job"], r["index"]): r["answer"] for r in read_answers(single)}
    assert {(r["job"], r["index"]): r["answer"] for r in got} == by_key, "Ray answers as one process does"
