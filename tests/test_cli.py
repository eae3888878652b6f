"""The command line, run as a user would (subprocesses), including the README's default run."""

from __future__ import annotations

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwen2rt", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_default_generate_runs_tiny_and_says_so():
    r = run("generate", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The quick brown fox")
    notes = [line for line in r.stderr.splitlines() if "random weights" in line]
    assert len(notes) == 1 and "'tiny'" in notes[0]


def test_generate_with_flags_is_deterministic():
    args = ("generate", "--prompt", "Hi", "--max-tokens", "16", "--temperature", "0.8", "--top-p", "0.9",
            "--request-seed", "5", "--ignore-eos")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("Hi")


def test_generate_and_chat_with_a_checkpoint_folder(hf_checkpoints, real_tok_dir):
    r = run("generate", "--model", real_tok_dir, "--prompt", "你好, Welt", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("你好, Welt") and "random weights" not in r.stderr
    r = run("chat", "--model", real_tok_dir, "--max-tokens", "4", "--system", "Be brief.", stdin="Hallo!\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 1
    # a folder without tokenizer.json cannot take a text prompt: a clear error, exit code 2
    path, _ = hf_checkpoints["dense_gqa"]
    r = run("generate", "--model", path, "--prompt", "hello")
    assert r.returncode == 2 and "ships no tokenizer.json" in r.stderr


def test_bad_arguments_exit_2_with_a_message():
    r = run("generate", "--temperature", "-1")
    assert r.returncode == 2 and "SamplingParams.temperature" in r.stderr
    r = run("generate", "--model", "no-such-model")
    assert r.returncode == 2 and "neither a checkpoint folder nor a built-in name" in r.stderr


def test_info_builtin_and_folder(hf_checkpoints):
    r = run("info", "--model", "qwen2-7b")
    assert r.returncode == 0, r.stderr
    assert "parameters: 7,615,616,512" in r.stdout and "bf16 14.141 GB" in r.stdout
    path, hf = hf_checkpoints["moe_renorm"]
    r = run("info", "--model", path, "--json")
    info = json.loads(r.stdout)
    assert info["config"]["num_experts"] == 7
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())


def test_chat_reads_turns_from_stdin():
    r = run("chat", "--max-tokens", "8", "--temperature", "0", stdin="hello\nsecond turn\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
