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
    r = run("generate", "--logit-bias", "65")
    assert r.returncode == 2 and "'65' is not TOKEN_ID=BIAS" in r.stderr
    r = run("generate", "--logit-bias", "65=300")
    assert r.returncode == 2 and "SamplingParams.logit_bias" in r.stderr


def test_logit_bias_and_min_tokens_flags():
    """--logit-bias 65=100 makes greedy decoding write "A" (byte 65 of the built-in tokenizer) every time;
    --min-tokens keeps eos (forced by a bias) away for that many tokens."""
    r = run("generate", "--prompt", "x", "--max-tokens", "5", "--temperature", "0", "--logit-bias", "65=100")
    assert r.returncode == 0 and r.stdout.startswith("xAAAAA"), (r.stdout, r.stderr)
    r = run("generate", "--prompt", "x", "--max-tokens", "8", "--temperature", "0", "--logit-bias", "258=100",
            "--logit-bias", "66=50", "--min-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("xBBB") and "BBBB" not in r.stdout, (r.stdout, r.stderr)
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


def test_bad_flags_and_files_are_one_line_errors(hf_checkpoints, real_tok_dir, tmp_path):
    """Each a message and exit code 2, never a traceback; and generate echoes no prompt before an error."""
    import shutil

    no_tokenizer, _ = hf_checkpoints["dense_gqa"]
    broken = tmp_path / "broken"
    shutil.copytree(real_tok_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    cases = [
        (("chat", "--model", no_tokenizer), "has no tokenizer.json: chat needs one"),
        (("generate", "--device", "gpu"), "device 'gpu': not a device torch knows"),
        (("info", "--bandwidth", "0"), "outside [1e-09, inf]"),
        (("info", "--bandwidth", "nan"), "nan is outside"),
        (("serve", "--port", "99999"), "99999 is outside [0, 65535]"),
        (("profile", "--batch", "0"), "0 is outside [1, inf]"),
        (("profile", "--trace", str(tmp_path / "no" / "such" / "t.json")), "does not exist"),
        (("generate", "--model", str(broken)), "cannot read tokenizer.json"),
        (("generate", "--max-seq-len", "8", "--prompt", "a prompt longer than eight bytes"), "context holds 8"),
    ]
    for args, words in cases:
        r = run(*args, stdin="")
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_a_reader_that_leaves_early_is_no_error():
    """`qwen2rt generate ... | head -c 10`: the closed pipe ends the command quietly, as Unix tools do (the pieces
    streamed after the reader left hit the closed pipe)."""
    p = subprocess.Popen([sys.executable, "-m", "qwen2rt", "generate", "--max-tokens", "300", "--ignore-eos"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err
