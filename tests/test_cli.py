"""The `neoxfuse` command as a new user meets it on a CPU machine: useful output or one clear line, never a traceback."""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import CHAT_TEMPLATE, neoxfuse_command

import neoxfuse
import neoxfuse.cli
from neoxfuse import bench
from neoxfuse.cli import _read_turn, main
from neoxfuse.engine import Engine
from neoxfuse.sampling import SamplingParams
from neoxfuse.scoring import CorpusScores
from neoxfuse.weights import random_model


def _neoxfuse(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m neoxfuse ARGS` in a fresh process, finding this checkout's package."""
    command, env = neoxfuse_command(*args, env=env)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("neoxfuse: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    random_model("tiny", seed=3).save_pretrained(directory)
    return directory


def test_env_describes_a_cpu_machine(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"neoxfuse {neoxfuse.__version__}" in out
    assert f"torch: {torch.__version__}" in out and "transformers: " in out
    assert "library: " in out and "reference: yes" in out
    if not torch.cuda.is_available():
        assert "GPUs: none" in out


def test_env_without_the_library_still_reports(tmp_path):
    result = _neoxfuse("env", env=dict(os.environ, NEOXFUSE_LIB=str(tmp_path / "missing.so")))
    assert result.returncode == 0, result.stderr
    assert "library: not usable: libneoxfuse.so not found" in result.stdout
    assert "backends" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default model")
def test_generate_with_the_default_model_on_a_cpu():
    result = _neoxfuse("generate", "--tokens", "1,2,3", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "random-initialised pythia-70m" in result.stderr and "CPU" in result.stderr
    assert "prompt (3 tokens): 1,2,3" in result.stdout
    assert "backend reference (auto: reference; not fused: the fused kernels need a CUDA GPU)" in result.stdout
    generated = next(line for line in result.stdout.splitlines() if line.startswith("generated"))
    assert generated.startswith("generated (3 tokens): ") and len(generated.split(": ")[1].split(",")) == 3
    assert "TPOT" in result.stdout


def test_generate_from_a_checkpoint_and_sampling_options(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--tokens", "5,6", "--max-new-tokens", "6", "--device", "cpu"]
    sampled = [*args, "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "4"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out.splitlines()[2] == first.splitlines()[2]  # the generated tokens, reproduced
    assert "seed 4 (--seed 4 draws these tokens again)" in first
    assert main([*args, "--temperature", "0.9"]) == 0  # unseeded, a checkpoint's weights: its seed redraws the tokens
    out = capsys.readouterr().out
    seed = int(out.split("seed ")[1].split(" ")[0])
    assert f"(--seed {seed} draws these tokens again)" in out
    assert main([*args, "--temperature", "0.9", "--seed", str(seed)]) == 0
    assert capsys.readouterr().out.splitlines()[2] == out.splitlines()[2]
    random_init = ["generate", "--model", "tiny", "--tokens", "5,6", "--max-new-tokens", "3", "--device", "cpu", "--temperature", "0.9"]
    assert main(random_init) == 0  # unseeded, random weights from seed 0: --seed N would change the weights too
    assert "draws these tokens again" not in capsys.readouterr().out
    assert main(args) == 0
    assert "random-initialised" not in capsys.readouterr().err
    engine = Engine(str(tiny_checkpoint), device="cpu")
    want = engine.generate([5, 6], 12, SamplingParams(repetition_penalty=0.3)).tokens  # it makes this model repeat itself
    assert main([*args, "--max-new-tokens", "12", "--repetition-penalty", "0.3"]) == 0
    out = capsys.readouterr().out
    assert f"generated (12 tokens): {','.join(map(str, want))}" in out and "repetition penalty 0.3 on the prompt" in out
    assert want != engine.generate([5, 6], 12).tokens
    banned = engine.generate([5, 6], 12, SamplingParams(repetition_penalty=0.3, no_repeat_ngram_size=2)).tokens
    assert main([*args, "--max-new-tokens", "12", "--repetition-penalty", "0.3", "--no-repeat-ngram-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"generated (12 tokens): {','.join(map(str, banned))}" in out and "no 2-gram of the prompt and the generated" in out
    assert banned != want
    counted = engine.generate([5, 6], 12, SamplingParams(presence_penalty=-2.0, frequency_penalty=0.5)).tokens
    assert main([*args, "--max-new-tokens", "12", "--presence-penalty", "-2", "--frequency-penalty", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"generated (12 tokens): {','.join(map(str, counted))}" in out
    assert "presence penalty -2.0, frequency penalty 0.5 on the generated tokens" in out and counted != want
    filters = {"top_p": 0.9, "min_p": 0.05, "typical_p": 0.8, "epsilon_cutoff": 1e-3, "eta_cutoff": 2e-3}
    drawn = engine.generate([5, 6], 12, SamplingParams(temperature=0.9, seed=4, **filters)).tokens
    flags = [text for name, value in filters.items() for text in ("--" + name.replace("_", "-"), str(value))]
    assert main([*args, "--max-new-tokens", "12", "--temperature", "0.9", "--seed", "4", *flags]) == 0
    out = capsys.readouterr().out
    assert f"generated (12 tokens): {','.join(map(str, drawn))}" in out
    assert "top-p 0.9, min-p 0.05, typical-p 0.8, epsilon-cutoff 0.001, eta-cutoff 0.002, seed 4" in out
    assert main([*args, "--typical-p", "0.5", "--eta-cutoff", "0.1"]) == 0
    assert "greedy decoding (--temperature 0): --typical-p, --eta-cutoff have no effect" in capsys.readouterr().err


def test_generate_prints_each_new_tokens_logprobs(tiny_checkpoint, tiny_checkpoint_with_tokenizer, capsys):
    args = ["generate", "--tokens", "5,6", "--max-new-tokens", "3", "--device", "cpu", "--temperature", "1.3", "--seed", "2"]
    out = Engine(str(tiny_checkpoint_with_tokenizer), device="cpu").generate([5, 6], 3, SamplingParams(temperature=1.3, seed=2),
                                                                             stop_token_ids=0, logprobs=2)
    assert main([*args, "--model", str(tiny_checkpoint_with_tokenizer), "--logprobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("logprobs (natural log, from the model's logits before the sampling rule):")
    words = {token: f"{token} 'w{token}'" for entry in out.logprobs for token, _ in (*entry.top, (entry.token, 0))}
    assert lines[start + 1 : start + 4] == [
        f"  {words[entry.token]} {entry.logprob:.4f}  (most likely: {', '.join(f'{words[t]} {v:.4f}' for t, v in entry.top)})"
        for entry in out.logprobs]
    assert main([*args, "--model", str(tiny_checkpoint), "--logprobs", "0"]) == 0  # no tokenizer: ids alone, no alternatives
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("logprobs (natural log, from the model's logits before the sampling rule):")
    assert [line.split()[0] for line in lines[start + 1 : start + 4]] == lines[2].split(": ")[1].split(",")
    assert "most likely" not in lines[start + 1]
    assert main([*args, "--model", "tiny", "--logprobs", "21"]) == 1
    assert "logprobs must be None or an integer from 0 to 20" in _one_line_error(capsys.readouterr().err)
    assert main([*args, "--model", "tiny", "--logprobs", "1", "--interactive"]) == 1
    assert "--logprobs lists a generation's tokens after it" in _one_line_error(capsys.readouterr().err)


def test_generate_writes_the_generation_to_a_json_file(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    args = ["generate", "--tokens", "5,6", "--max-new-tokens", "4", "--device", "cpu", "--temperature", "1.3", "--seed", "2",
            "--model", str(tiny_checkpoint_with_tokenizer)]
    want = Engine(str(tiny_checkpoint_with_tokenizer), device="cpu").generate(
        [5, 6], 4, SamplingParams(temperature=1.3, seed=2), stop_token_ids=0, logprobs=2)
    assert main([*args, "--logprobs", "2", "--out", str(tmp_path / "out.json")]) == 0
    assert f"results: {tmp_path / 'out.json'}" in capsys.readouterr().out
    got = json.loads((tmp_path / "out.json").read_text())
    assert (got["model"], got["backend"], got["device"], got["dtype"]) == (str(tiny_checkpoint_with_tokenizer), "reference", "cpu",
                                                                           "float32")
    assert got["sampling"]["temperature"] == 1.3 and got["sampling"]["top_p"] == 1.0 and got["seed"] == 2
    assert (got["prompt_tokens"], got["tokens"], got["text"]) == ([5, 6], want.tokens, want.text)
    assert len(got["decode_ms"]) == len(want.tokens) - 1 and got["tpot_ms"] == pytest.approx(sum(got["decode_ms"]) / 3)
    assert got["prefill_ms"] > 0 and got["reused_tokens"] == 0
    assert got["logprobs"] == [{"token": entry.token, "logprob": entry.logprob, "top": [list(pair) for pair in entry.top]}
                               for entry in want.logprobs]
    assert main([*args, "--out", str(tmp_path / "greedy.json"), "--temperature", "0"]) == 0
    assert json.loads((tmp_path / "greedy.json").read_text())["logprobs"] is None
    assert main([*args, "--out", str(tmp_path / "x.json"), "--interactive"]) == 1
    assert "--out writes a generation's tokens after it; --interactive streams turns instead" in _one_line_error(capsys.readouterr().err)


def test_generate_streams_ids_or_text(tiny_checkpoint, tiny_checkpoint_with_tokenizer, capsys):
    args = ["generate", "--tokens", "5,6", "--max-new-tokens", "40", "--device", "cpu", "--stream"]
    assert main([*args, "--model", str(tiny_checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == lines[3].split(": ")[1]  # the streamed ids, then the summary's "generated (40 tokens): ..."
    assert main([*args, "--model", str(tiny_checkpoint_with_tokenizer)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("text: ") and lines[-2].endswith(lines[0])  # the streamed text is the summary's


def test_generate_from_a_hub_repo_id_in_the_local_cache(hub_cache, capsys, word_tokenizer):
    model = random_model("tiny", seed=3)
    snapshot = hub_cache.snapshot("EleutherAI/pythia-tiny", revision="step1000")
    model.save_pretrained(snapshot)
    word_tokenizer(model.config.vocab_size).save_pretrained(snapshot)
    args = ["generate", "--model", "EleutherAI/pythia-tiny", "--prompt", "hello world", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*args, "--revision", "step1000"]) == 0
    captured = capsys.readouterr()
    assert f"model: EleutherAI/pythia-tiny at step1000 ({snapshot}" in captured.out and "random-initialised" not in captured.err
    assert main(args) == 1  # main is not cached
    assert "hf download EleutherAI/pythia-tiny`" in _one_line_error(capsys.readouterr().err)


def _interactive(monkeypatch, capsys, lines: str, *args: str) -> tuple[list[str], str]:
    """`generate --interactive ARGS` (tiny, CPU, 4 new tokens) with `lines` on stdin: (stdout lines, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "4", "--interactive", *args]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_interactive_continues_the_text_line_by_line_from_its_kv_cache(monkeypatch, capsys):
    out, err = _interactive(monkeypatch, capsys, "5,6\n\nx\n1,600\n7\n", "--model", "tiny", "--tokens", "1,2,3")
    engine = Engine("tiny", device="cpu")
    text, want = [1, 2, 3], []
    for added in [[], [5, 6], [], [7]]:
        text += added
        want.append(engine.generate(text, 4).tokens)
        text += want[-1]
    assert out == [",".join(map(str, tokens)) for tokens in want]
    assert [line.split("; ")[0] for line in err.splitlines() if line.startswith("[")] == [
        "[3 tokens of context, 0 reused from the cache",
        "[9 tokens of context, 6 reused from the cache",  # all but the last new token, never fed back
        "[13 tokens of context, 12 reused from the cache",
        "[18 tokens of context, 16 reused from the cache",  # the two bad lines changed nothing
    ]
    assert "error: token ids are integers separated by commas, like 1,2,3; got 'x'" in err
    assert "error: token ids must be in [0, 512)" in err


def test_interactive_without_a_prompt_starts_at_the_first_line_with_tokens(monkeypatch, capsys):
    out, err = _interactive(monkeypatch, capsys, "\n5,6\n", "--model", "tiny")
    assert out == [",".join(map(str, Engine("tiny", device="cpu").generate([5, 6], 4).tokens))]
    assert "error" not in err and "[2 tokens of context, 0 reused from the cache" in err


def _interrupt_once(monkeypatch) -> None:
    """Ctrl-C once: in the first turn that streams, after its first token is printed."""
    interrupts = [KeyboardInterrupt]

    class InterruptedOnce(neoxfuse.cli._Stream):
        def __call__(self, tokens):
            if self.tokens and interrupts:
                raise interrupts.pop()
            super().__call__(tokens)

    monkeypatch.setattr(neoxfuse.cli, "_Stream", InterruptedOnce)


def test_interactive_ctrl_c_ends_the_turn_not_the_session(monkeypatch, capsys):
    _interrupt_once(monkeypatch)
    out, err = _interactive(monkeypatch, capsys, "5\n", "--model", "tiny", "--tokens", "1,2,3")
    engine = Engine("tiny", device="cpu")
    first = engine.generate([1, 2, 3], 1).tokens
    assert out == [str(first[0]), ",".join(map(str, engine.generate([1, 2, 3, *first, 5], 4).tokens))]
    assert "[interrupted;" in err and "[5 tokens of context, 0 reused from the cache" in err


def test_interactive_drops_the_oldest_half_of_a_full_context(monkeypatch, capsys):
    out, err = _interactive(monkeypatch, capsys, "5,6\n\n7\n\n", "--model", "tiny", "--tokens", "1,2,3", "--max-seq-len", "16")
    # Room for 16 - 4 + 1 = 13 tokens of context: the fourth turn's 17 + 1 keep their last 6, the fifth reuses them.
    assert "the context is full: dropping the oldest 12 tokens" in err
    reused = [line.split("; ")[0].split(", ")[1] for line in err.splitlines() if line.startswith("[")]
    assert reused == [f"{n} reused from the cache" for n in [0, 6, 12, 0, 9]]
    turns = [list(map(int, line.split(","))) for line in out]
    text = [1, 2, 3, *turns[0], 5, 6, *turns[1], *turns[2], 7]
    assert turns[3] == Engine("tiny", device="cpu").generate(text[-6:], 4).tokens


def test_interactive_reads_text_with_a_tokenizer(monkeypatch, capsys, tiny_checkpoint_with_tokenizer):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    out, err = _interactive(monkeypatch, capsys, "world w7\n", "--model", checkpoint, "--prompt", "hello")
    engine = Engine(checkpoint, device="cpu")
    first = engine.generate([1], 4, stop_token_ids=(0,))
    second = engine.generate([1, *first.tokens, 2, 7], 4, stop_token_ids=(0,))
    assert out == [first.text, second.text]
    assert f"[{len(second.prompt_tokens)} tokens of context, {len(first.tokens)} reused from the cache" in err


def test_generate_reads_the_prompt_from_a_file(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    args = ["generate", "--device", "cpu", "--model", str(tiny_checkpoint_with_tokenizer), "--max-new-tokens", "6"]
    text = "w9 w10\nhello world\n"
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("w9 caf\xe9".encode("latin-1"))

    def untimed(out: str) -> list[str]:
        return [line for line in out.splitlines() if not line.startswith("prefill ")]

    assert main([*args, "--prompt", text]) == 0
    want = untimed(capsys.readouterr().out)
    assert main([*args, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    assert untimed(capsys.readouterr().out) == want and "text: w9 w10" in want
    for path, message in [("latin1.txt", "latin1.txt is not UTF-8 text"), ("missing.txt", "No such file or directory")]:
        assert main([*args, "--prompt-file", str(tmp_path / path)]) == 1
        assert message in _one_line_error(capsys.readouterr().err)
    assert main([*args, "--prompt", text, "--prompt-file", str(tmp_path / "prompt.txt")]) == 2  # a usage error
    assert "argument --prompt-file: not allowed with argument --prompt" in capsys.readouterr().err


def test_generate_ends_at_the_generation_configs_end_of_text_tokens(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    shutil.copytree(tiny_checkpoint_with_tokenizer, tmp_path / "chat")
    plain = Engine(str(tiny_checkpoint_with_tokenizer), device="cpu").generate("w9 w10", 12).tokens
    end = next(token for token in plain[2:] if token not in plain[:2])
    (tmp_path / "chat" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end]}))
    assert main(["generate", "--device", "cpu", "--model", str(tmp_path / "chat"), "--prompt", "w9 w10", "--max-new-tokens", "12"]) == 0
    want = plain[: plain.index(end) + 1]
    assert f"generated ({len(want)} tokens): {','.join(map(str, want))}" in capsys.readouterr().out


@pytest.fixture
def chat_template(tmp_path) -> str:
    path = tmp_path / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return str(path)


def test_generate_chat_answers_the_message_rendered_by_the_template(tiny_checkpoint_with_tokenizer, chat_template, capsys):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    want = Engine(checkpoint, device="cpu").generate("w4 w9 w10 w6", 6, stop_token_ids=(0,))
    assert main(["generate", "--device", "cpu", "--model", checkpoint, "--prompt", "w9 w10", "--max-new-tokens", "6",
                 "--chat-template", chat_template]) == 0
    out = capsys.readouterr().out
    assert f"generated ({len(want.tokens)} token{'s' * (len(want.tokens) > 1)}): {','.join(map(str, want.tokens))}" in out and f"text: w4 w9 w10 w6{want.text}" in out
    system = Engine(checkpoint, device="cpu").generate("w3 w20 w4 w9 w10 w6", 6, stop_token_ids=(0,))
    assert main(["generate", "--device", "cpu", "--model", checkpoint, "--prompt", "w9 w10", "--max-new-tokens", "6",
                 "--chat-template", chat_template, "--system", "w20"]) == 0
    assert f"text: w3 w20 w4 w9 w10 w6{system.text}" in capsys.readouterr().out
    for args, message in [(["--chat", "--prompt", "w9"], "the model has no chat template (its tokenizer holds none)"),
                          (["--prompt", "w9", "--system", "w20"], "--system is a chat's system message: give --chat too"),
                          (["--chat", "--tokens", "1,2"], "--chat takes the user's message as text"),
                          (["--prompt", "w9", "--chat-template", chat_template + ".missing"], "--chat-template " + chat_template)]:
        assert main(["generate", "--device", "cpu", "--model", checkpoint, *args]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("system", [None, "w20"])
def test_interactive_chat_answers_each_line_as_the_users_message(monkeypatch, capsys, tiny_checkpoint_with_tokenizer, chat_template,
                                                                 system):
    # Room for 24 - 4 + 1 = 21 tokens of conversation: the fourth message's turn (3 exchanges of 2 + 5
    # tokens or fewer, its own 2 and 1) drops the oldest exchange; a system message stays first.
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    out, err = _interactive(monkeypatch, capsys, "w9\n\nw10 w11\nw12\n", "--model", checkpoint, "--prompt", "w8",
                            "--chat-template", chat_template, "--max-seq-len", "24", *(["--system", system] if system else []))
    engine = Engine(checkpoint, device="cpu")
    said, replies, printed = [], [], []

    def rendered() -> str:
        return (f"w3 {system} " if system else "") + "".join(f"w4 {user} w5 {reply} " for user, reply in zip(said, replies)) + \
            f"w4 {said[-1]} w6"

    for message in ["w8", "w9", "w10 w11", "w12"]:
        said.append(message)
        while len(engine.encode(rendered())) > 21 and len(said) > 1:
            said, replies = said[1:], replies[1:]
        replies.append(engine.generate(rendered(), 4, stop_token_ids=(0,)).text)
        printed.append(replies[-1])
    assert out == printed and len(said) == 3 and "dropping the oldest exchange" in err
    assert f"[{5 if system else 3} tokens of conversation, 0 reused from the cache" in err


def test_interactive_chat_ctrl_c_keeps_the_reply_so_far(monkeypatch, capsys, tiny_checkpoint_with_tokenizer, chat_template):
    _interrupt_once(monkeypatch)
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    out, _ = _interactive(monkeypatch, capsys, "w9\n", "--model", checkpoint, "--prompt", "w8", "--chat-template", chat_template)
    engine = Engine(checkpoint, device="cpu")
    first = engine.generate("w4 w8 w6", 1, stop_token_ids=(0,)).text
    assert out == [first, engine.generate(f"w4 w8 w5 {first} w4 w9 w6", 4, stop_token_ids=(0,)).text]


def test_generate_and_interactive_stop_after_a_stop_text(monkeypatch, capsys, tiny_checkpoint_with_tokenizer):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    engine = Engine(checkpoint, device="cpu")
    words = engine.generate("hello", 12, stop_token_ids=(0,)).text.split()
    stop = f"{words[1]} {words[2]}"
    want = engine.generate("hello", 12, stop_token_ids=(0,), stop=stop)
    assert len(want.tokens) <= 3  # fewer than the interactive turns' 4
    args = ["--model", checkpoint, "--prompt", "hello", "--stop", stop, "--stop", "never"]
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "12", *args]) == 0
    assert f"generated ({len(want.tokens)} tokens): {','.join(map(str, want.tokens))}" in capsys.readouterr().out
    out, _ = _interactive(monkeypatch, capsys, "world\n", *args)  # 4 new tokens at most
    second = engine.generate([1, *want.tokens, 2], 4, stop_token_ids=(0,), stop=stop)
    assert out == [want.text, second.text]


def test_interactive_lines_are_encoded_without_their_newline(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n\nw7"))
    engine = types.SimpleNamespace(tokenizer=object(), encode=lambda text: [len(text)])
    assert [_read_turn(engine) for _ in range(4)] == [[11], [], [2], None]  # an empty line adds nothing; then EOF


def test_interactive_mistakes_are_one_line_errors(capsys):
    assert main(["generate", "--device", "cpu", "--model", "tiny"]) == 1
    assert "generate needs a prompt: --prompt TEXT, --prompt-file FILE, --tokens 1,2,3 or --interactive" in _one_line_error(capsys.readouterr().err)
    assert main(["generate", "--device", "cpu", "--model", "tiny", "--interactive", "--max-seq-len", "8", "--max-new-tokens", "9"]) == 1
    assert "--max-new-tokens 9 leaves no room for a prompt in the 8-position KV cache" in _one_line_error(capsys.readouterr().err)
    assert main(["generate", "--device", "cpu", "--model", "tiny", "--tokens", "1", "--stop", "w1"]) == 1
    assert "--stop matches text, and tiny (random-initialised) has no tokenizer" in _one_line_error(capsys.readouterr().err)


def test_perplexity_of_a_text_file_with_hf_alongside(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("hello world w7 w12 w3 w3 hello\nw40 w41 world w9 w250 hello w17")
    out_file = tmp_path / "ppl.json"
    args = ["perplexity", "--device", "cpu", "--model", checkpoint, "--file", str(text), "--window", "5"]
    assert main([*args, "--max-tokens", "12", "--compare-hf", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    engine = Engine(checkpoint, device="cpu", max_seq_len=5)
    want = engine.score(engine.encode(text.read_text())[:12], window=5)
    results = json.loads(out_file.read_text())
    assert results["tokens"] == 12 and results["window"] == 5 and results["stride"] == 4 and results["windows"] == 3
    assert results["neoxfuse"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
    assert results["hf"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    assert results["difference"]["top1_agreement"] == 1.0 and results["difference"]["max_abs_nll"] < 1e-4
    assert "scored: the 11 tokens after the first of 12, in 3 windows of up to 5 tokens (overlapping by one)" in out
    assert f"neoxfuse (reference): perplexity {want.perplexity:.4f}" in out and "HF transformers" in out
    assert main([*args, "--stride", "2", "--out", str(out_file)]) == 0  # every token, a window every 2 tokens, no HF
    out = capsys.readouterr().out
    want = engine.score(engine.encode(text.read_text()), window=5, stride=2)
    results = json.loads(out_file.read_text())
    assert results["tokens"] == 14 and results["stride"] == 2 and results["windows"] == 6 and "hf" not in results
    assert results["neoxfuse"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
    assert ("the 13 tokens after the first of 14, in 6 windows of up to 5 tokens (one every 2 tokens: a token after the "
            "first window has at least 3 tokens of context)") in out and "HF transformers" not in out


def test_perplexity_after_the_end_of_text_token_per_word_and_byte(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    text = "hello world w7 w12 w3 w3 hello\nw40 w41 world w9 w250 hello w17"
    out_file = tmp_path / "ppl.json"
    args = ["perplexity", "--device", "cpu", "--model", checkpoint, "--text", text, "--window", "5", "--prefix-token", "eos"]
    assert main([*args, "--compare-hf", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    engine = Engine(checkpoint, device="cpu", max_seq_len=5)
    want = engine.score(text, window=5, prefix_token=0)  # the word tokenizer's end of text is id 0
    measures = want.text_measures(text)
    results = json.loads(out_file.read_text())
    assert results["tokens"] == 15 and results["prefix_token"] == 0 and results["windows"] == 4
    assert "scored: the 14 tokens of the text after the prefix token 0, in 4 windows" in out
    for scorer, rel in (("neoxfuse", 1e-9), ("hf", 1e-5)):
        assert results[scorer]["perplexity"] == pytest.approx(want.perplexity, rel=rel)
        assert results[scorer]["words"] == 14 and results[scorer]["bytes"] == len(text)
        for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert results[scorer][name] == pytest.approx(getattr(measures, name), rel=rel)
    assert f"word perplexity {measures.word_perplexity:.4f} (14 words)" in out
    assert main([*args, "--max-tokens", "6", "--out", str(out_file)]) == 0  # a cut text: no per-word measures
    out = capsys.readouterr().out
    results = json.loads(out_file.read_text())
    assert results["tokens"] == 7 and "word_perplexity" not in results["neoxfuse"]
    assert "no word or byte perplexity: they are of a whole text, and --max-tokens cut it" in out
    assert results["neoxfuse"]["perplexity"] == pytest.approx(engine.score(engine.encode(text)[:6], window=5, prefix_token=0).perplexity)


def test_perplexity_of_a_corpus_sums_over_its_documents(tiny_checkpoint_with_tokenizer, tmp_path, capsys):
    checkpoint = str(tiny_checkpoint_with_tokenizer)
    texts = ["hello world w7 w12 w3 w3 hello", "w40", "w41 world w9 w250 hello w17\nw5 w6 w7 w8 w9"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(f'{json.dumps(texts[0])}\n{{"text": {json.dumps(texts[1])}, "id": 7}}\n\n{{"text": {json.dumps(texts[2])}}}\n')
    out_file = tmp_path / "ppl.json"
    args = ["perplexity", "--device", "cpu", "--model", checkpoint, "--documents", str(corpus), "--window", "5"]
    assert main([*args, "--prefix-token", "eos", "--compare-hf", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    engine = Engine(checkpoint, device="cpu", max_seq_len=5)
    documents = [engine.score(text, window=5, prefix_token=0) for text in texts]  # each on its own, after the end of text
    want = CorpusScores(tuple(documents))
    measures = want.text_measures(texts)
    results = json.loads(out_file.read_text())
    assert results["documents"] == 3 and results["tokens"] == 8 + 2 + 12 and results["prefix_token"] == 0
    assert results["windows"] == sum(document.windows for document in documents) == 2 + 1 + 3
    assert "scored: 3 documents, one at a time from an empty context: 19 tokens, every token of each after the prefix token 0, in 6 windows" in out
    for scorer, rel in (("neoxfuse", 1e-9), ("hf", 1e-5)):
        assert results[scorer]["perplexity"] == pytest.approx(want.perplexity, rel=rel)
        assert results[scorer]["words"] == 19 and results[scorer]["bytes"] == sum(len(text) for text in texts)
        assert results[scorer]["word_perplexity"] == pytest.approx(measures.word_perplexity, rel=rel)
        assert results[scorer]["bits_per_byte"] == pytest.approx(measures.bits_per_byte, rel=rel)
        assert results[scorer]["document_perplexities"] == pytest.approx([d.perplexity for d in documents], rel=rel)
    assert results["difference"]["top1_agreement"] == 1.0 and results["difference"]["max_abs_nll"] < 1e-4
    assert f"word perplexity {measures.word_perplexity:.4f} (19 words)" in out
    # The text scored and the text counted under keys of their own (wikitext's: a detokenized page,
    # words counted in the page as it was); the first N documents; no prefix token: no word measures.
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps({"page": text, "raw": f"{text} @-@ x"}) + "\n" for text in texts))
    counted = [f"{text} @-@ x" for text in texts[:2]]
    assert main([*args, "--documents", str(pages), "--text-key", "page", "--count-key", "raw", "--max-documents", "2",
                 "--prefix-token", "0", "--out", str(out_file)]) == 0
    results = json.loads(out_file.read_text())
    want = CorpusScores(tuple(documents[:2]))
    assert results["documents"] == 2 and results["neoxfuse"]["words"] == 12
    assert results["neoxfuse"]["word_perplexity"] == pytest.approx(want.text_measures(counted).word_perplexity, rel=1e-9)
    assert main([*args, "--out", str(out_file)]) == 1  # the second document is one token: without a prefix, nothing to score
    assert "document 2: scoring needs at least 2 tokens" in _one_line_error(capsys.readouterr().err)
    corpus.write_text("\n".join(json.dumps(text) for text in (texts[0], texts[2])))
    assert main([*args, "--out", str(out_file)]) == 0
    results = json.loads(out_file.read_text())
    want = CorpusScores((engine.score(texts[0], window=5), engine.score(texts[2], window=5)))
    assert results["neoxfuse"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-9) and "words" not in results["neoxfuse"]
    assert "2 documents, one at a time from an empty context: 16 tokens, all but the first of each" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "perplexity needs a text: --file PATH, --text TEXT, --tokens 1,2,3 or --documents FILE.jsonl"),
        (["--text", "hello world"], "needs a tokenizer"),
        (["--tokens", "1,2", "--window", "1"], "--window must be at least 2"),
        (["--tokens", "1,2", "--window", "300"], "a scoring window of 300 tokens runs the model on 299 positions (its last token is only predicted), more than the 256 of the KV cache"),
        (["--tokens", "1,2", "--max-tokens", "1"], "--max-tokens must be at least 2"),
        (["--tokens", "1,2", "--window", "4", "--stride", "4"], "from 1 to the window's 4 tokens minus one"),
        (["--tokens", "1,2", "--stride", "0"], "the stride between scoring windows must be an integer from 1 to the window's 257"),
        (["--tokens", "1"], "at least 2 tokens"),
        (["--tokens", "1,2", "--file", "x"], "not allowed with argument"),
        (["--file", "missing.txt"], "No such file"),
        (["--file", "latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--tokens", "1,2", "--prefix-token", "eos"], "--prefix-token eos needs a tokenizer with an end-of-text token"),
        (["--tokens", "1,2", "--prefix-token", "first"], "--prefix-token takes a token id or 'eos', got 'first'"),
        (["--tokens", "1,2", "--prefix-token", "-1"], r"prefix_token must be a token id in [0, "),
        (["--tokens", "1,2", "--max-documents", "2"], "--max-documents choose what --documents' file is read as; there is no --documents"),
        (["--text", "a", "--text-key", "page", "--count-key", "raw"], "--text-key and --count-key choose what --documents'"),
        (["--documents", "corpus.jsonl", "--max-tokens", "5"], "--max-tokens cuts one text; with --documents, --max-documents"),
        (["--documents", "corpus.jsonl", "--max-documents", "0"], "--max-documents must be at least 1; got 0"),
        (["--documents", "corpus.jsonl", "--tokens", "1,2"], "not allowed with argument"),
        (["--documents", "corpus.jsonl"], "needs a tokenizer"),
        (["--documents", "corpus.jsonl", "--text-key", "page"], "corpus.jsonl:1: the document has no 'page' (its keys: id, text)"),
        (["--documents", "corpus.jsonl", "--count-key", "raw"], "corpus.jsonl:1: the document has no 'raw' (its keys: id, text)"),
        (["--documents", "strings.jsonl", "--count-key", "raw"], "strings.jsonl:1: --count-key needs each document to be an object"),
        (["--documents", "bad.jsonl"], "bad.jsonl:3 is not a line of JSON"),
        (["--documents", "empty_text.jsonl"], "empty_text.jsonl:2: a document's text is a non-empty JSON string, got ''"),
        (["--documents", "numbers.jsonl"], "numbers.jsonl:1: a document's text is a non-empty JSON string, got 5"),
        (["--documents", "blank.jsonl"], "blank.jsonl holds no documents"),
    ],
)
def test_perplexity_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world", "id": 1}\n')
    (tmp_path / "strings.jsonl").write_text('"hello world"\n')
    (tmp_path / "bad.jsonl").write_text('"hello"\n\n{"text": "world"\n')
    (tmp_path / "empty_text.jsonl").write_text('"hello"\n{"text": ""}\n')
    (tmp_path / "numbers.jsonl").write_text('5\n')
    (tmp_path / "blank.jsonl").write_text('\n  \n')
    code = main(["perplexity", "--device", "cpu", "--model", "tiny", *args])
    err = capsys.readouterr().err
    if "not allowed" in message:  # argparse's usage error
        assert code == 2 and message in err
        return
    assert code == 1 and message in _one_line_error(err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "pythia-7b", "--tokens", "1"], "neither a known model name"),
        (["--model", "tiny", "--prompt", "hello"], "needs a tokenizer"),
        (["--model", "tiny", "--tokens", "1,2", "--max-new-tokens", "300"], "KV cache"),
        (["--model", "tiny", "--tokens", "1,600"], "token ids must be in"),
        (["--model", "tiny", "--tokens", "1", "--backend", "nope"], "available backends: fused, reference"),
        (["--model", "tiny", "--tokens", "1", "--top-p", "0"], "top_p"),
        (["--model", "tiny", "--tokens", "1", "--min-new-tokens", "-1"], "min_new_tokens must be an integer >= 0"),
        (["--model", "tiny", "--tokens", "1", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
        (["--model", "tiny", "--tokens", "1", "--no-repeat-ngram-size", "-2"], "no_repeat_ngram_size must be an integer >= 0"),
        (["--model", "tiny", "--tokens", "1", "--temperature", "1", "--min-p", "2"], r"min_p must be in [0, 1]"),
        (["--model", "tiny", "--tokens", "1", "--temperature", "1", "--typical-p", "0"], r"typical_p must be in (0, 1]"),
        (["--model", "tiny", "--tokens", "1", "--temperature", "1", "--eta-cutoff", "1"], r"eta_cutoff must be in [0, 1)"),
        (["--model", "tiny", "--tokens", "1", "--max-seq-len", "100000"], "max_seq_len"),
    ],
)
def test_generate_mistakes_are_one_line_errors(capsys, args, message):
    assert main(["generate", "--device", "cpu", *args]) == 1
    assert message in _one_line_error(capsys.readouterr().err)


def test_a_checkpoint_that_is_not_gpt_neox_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["generate", "--model", str(tmp_path), "--tokens", "1", "--device", "cpu"]) == 1
    assert "gpt_neox only" in _one_line_error(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_asking_for_a_gpu_on_a_cpu_machine_is_a_one_line_error(capsys):
    assert main(["generate", "--model", "tiny", "--tokens", "1", "--device", "cuda"]) == 1
    assert "needs a CUDA GPU" in _one_line_error(capsys.readouterr().err)


def test_usage_errors_exit_2_with_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out
    assert main(["generate", "--tokens", "1,x"]) == 2
    assert "--tokens: token ids are integers separated by commas, like 1,2,3; got '1,x'" in capsys.readouterr().err
    assert main(["generate", "--tokens", "1,,2"]) == 2  # not read as 1,2
    assert "--tokens: token ids are integers separated by commas, like 1,2,3; got '1,,2'" in capsys.readouterr().err
    assert main(["generate", "--tokens", " "]) == 2
    assert "--tokens needs at least one token id" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "decode" in capsys.readouterr().out


def test_bench_suites_are_discovered():
    found, broken = bench.suites()
    assert "decode" in found and not broken
    for module in found.values():
        assert module.HELP and callable(module.add_arguments) and callable(module.run)


def test_bench_decode_leaves_the_oracle_out_on_a_gpu_unless_asked():
    from neoxfuse.bench import decode

    model, greedy = random_model("tiny", seed=0), SamplingParams()
    default = argparse.Namespace(backends=None)
    contenders, skipped = decode._contenders(default, model, torch.device("cuda"), torch.float16, 16, greedy)
    assert "reference" not in {c.name for c in contenders} and "oracle" in skipped["reference"]
    contenders, skipped = decode._contenders(default, model, torch.device("cpu"), torch.float32, 16, greedy)
    assert "reference" in {c.name for c in contenders} and "reference" not in skipped
    asked = argparse.Namespace(backends=["reference"])
    contenders, skipped = decode._contenders(asked, model, torch.device("cpu"), torch.float32, 16, greedy)
    assert [c.name for c in contenders] == ["reference"] and not skipped


def test_bench_decode_takes_a_gptq_checkpoint_dequantized(tmp_path, capsys):
    from neoxfuse.quant import QuantConfig, quantize_gpt_neox, save_gptq_checkpoint

    checkpoint_dir, out_dir = tmp_path / "gptq", tmp_path / "results"
    save_gptq_checkpoint(quantize_gpt_neox(random_model("tiny", seed=3), QuantConfig(group_size=32)), checkpoint_dir)
    code = main(["bench", "decode", "--model", str(checkpoint_dir), "--device", "cpu", "--lengths", "4",
                 "--out-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    [path] = out_dir.glob("decode-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {row["backend"] for row in rows} == {"reference", "hf_eager"}
    assert all(row["model"] == f"{checkpoint_dir} (GPTQ int4, group size 32, dequantized to float32)" for row in rows)
    assert all(row["match"] for row in rows)  # both run the same dequantized weights in fp32


def test_bench_decode_names_a_hub_repo_id_it_read_from_the_cache(hub_cache, tmp_path, capsys):
    snapshot = hub_cache.snapshot("EleutherAI/pythia-tiny")
    random_model("tiny", seed=3).save_pretrained(snapshot)
    code = main(["bench", "decode", "--model", "EleutherAI/pythia-tiny", "--device", "cpu", "--lengths", "4",
                 "--out-dir", str(tmp_path / "results")])
    assert code == 0, capsys.readouterr().err
    [path] = (tmp_path / "results").glob("decode-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(row["model"] == f"EleutherAI/pythia-tiny ({snapshot})" for row in rows)


def test_bench_decode_on_a_cpu_writes_its_results(tmp_path, capsys):
    out_dir = tmp_path / "results"
    code = main(["bench", "decode", "--model", "tiny", "--device", "cpu", "--lengths", "4,9", "--out-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "hf_eager" in out and "skipped hf_compile" in out and "no copy probe" in out
    assert "targets (issue 4): for greedy fp16 runs of a pythia-2.8b-shaped model; not this run" in out
    [path] = out_dir.glob("decode-*.json")
    record = json.loads(path.read_text())
    assert record["suite"] == "decode" and record["commit"] and record["created"] and record["targets"] == []
    assert record["complete"] is True
    assert record["device"]["copy_GBps"] is None and record["device"]["sm"] is None
    assert {(row["backend"], row["context"]) for row in record["rows"]} == {
        (backend, length) for backend in ("reference", "hf_eager") for length in (4, 9)
    }
    for row in record["rows"]:
        assert {"model", "backend", "context", "tpot_ms", "floor_ms", "match"} <= set(row)
        assert row["tpot_ms"] > 0 and row["floor_ms"] is None
        assert row["match"] is (row["matched_tokens"] == row["context"])
    # fp32 on a CPU: the reference and HF agree token for token.
    assert all(row["match"] for row in record["rows"])


def test_bench_decode_targets_take_the_worst_context():
    from neoxfuse.bench import decode

    def row(backend, context, tpot_ms, floor_ms=2.0):
        return {"backend": backend, "context": context, "tpot_ms": tpot_ms, "floor_ms": floor_ms}

    rows = [row("fused", 16, 2.1), row("fused", 512, 2.2), row("fused", 2048, 2.6),  # 1.05, 1.10, 1.30 x floor
            row("hf_compile", 16, 3.0), row("hf_compile", 512, 2.8), row("hf_compile", 2048, 4.0),  # 1.43x, 1.27x, 1.54x
            row("hf_eager", 16, 20.0), row("hf_eager", 512, 21.0), row("hf_eager", 2048, 26.0)]  # >= 9.5x
    verdicts = [(t["shape"], t["value"], t["met"]) for t in decode._targets(rows)]
    assert verdicts == [
        ("fused, context <= 512", pytest.approx(1.1), True),
        ("fused, context 2048", pytest.approx(1.3), False),
        ("fused, every context", pytest.approx(2.8 / 2.2), False),
        ("fused, every context", pytest.approx(20 / 2.1), True),
    ]
    no_floor = [row(r["backend"], r["context"], r["tpot_ms"], floor_ms=None) for r in rows[:3]]
    assert [t["met"] for t in decode._targets(no_floor)] == [None] * 4  # no floor, no peers
    assert [t["met"] for t in decode._targets(rows[3:])] == [None] * 4  # no fused rows


def test_bench_decode_checks_the_targets_on_greedy_fp16_runs_of_the_target_shape(tmp_path, capsys, monkeypatch):
    from neoxfuse.bench import decode

    monkeypatch.setattr(decode, "TARGET_MODEL", "tiny")  # stands in for pythia-2.8b, which a CPU cannot run
    base = ["bench", "decode", "--model", "tiny", "--device", "cpu", "--lengths", "4", "--out-dir", str(tmp_path)]
    assert main([*base, "--dtype", "fp16"]) == 0, capsys.readouterr().err
    assert "targets (issue 4, H100):" in capsys.readouterr().out
    assert main([*base, "--dtype", "fp32"]) == 0, capsys.readouterr().err
    assert "targets (issue 4): for greedy fp16 runs of a tiny-shaped model; not this run" in capsys.readouterr().out
    fp16, fp32 = sorted(tmp_path.glob("decode-*.json"), key=lambda path: json.loads(path.read_text())["dtype"])
    targets = json.loads(fp16.read_text())["targets"]
    assert len(targets) == 4 and all(t["met"] is None for t in targets)  # no fused row on a CPU: not measured
    assert json.loads(fp32.read_text())["targets"] == []


def test_bench_decode_stopped_part_way_keeps_the_runs_it_finished(tmp_path, capsys, monkeypatch):
    from neoxfuse.bench import decode

    generate = decode.HFContender.generate

    def stopped_at_the_second_length(self, prompt, new_tokens):
        if new_tokens == 9:
            raise KeyboardInterrupt  # as a pipeline's --budget or a user stops it
        return generate(self, prompt, new_tokens)

    monkeypatch.setattr(decode.HFContender, "generate", stopped_at_the_second_length)
    code = main(["bench", "decode", "--model", "tiny", "--device", "cpu", "--lengths", "4,9", "--out-dir", str(tmp_path)])
    assert code == 130
    [path] = tmp_path.glob("decode-*.json")
    record = json.loads(path.read_text())
    assert record["complete"] is False
    # reference ran both lengths, hf_eager (the baseline) only the first: matches only where it ran
    assert [(row["backend"], row["context"], row["match"]) for row in record["rows"]] == [
        ("reference", 4, True), ("hf_eager", 4, True), ("reference", 9, None)]


def test_bench_decode_samples_when_asked(tmp_path, capsys):
    out_dir = tmp_path / "results"
    code = main(["bench", "decode", "--model", "tiny", "--device", "cpu", "--lengths", "6", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3", "--out-dir", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    assert "sampled temperature 0.8, top_k 0, top_p 0.9, seed 3" in capsys.readouterr().out
    [path] = out_dir.glob("decode_sampled-*.json")
    record = json.loads(path.read_text())
    assert record["suite"] == "decode_sampled"
    sampling = {"temperature": 0.8, "top_k": 0, "top_p": 0.9, "seed": 3}
    assert record["sampling"] == sampling
    assert {row["backend"] for row in record["rows"]} == {"reference", "hf_eager"}
    for row in record["rows"]:
        assert row["sampling"] == sampling and row["match"] is None and row["matched_tokens"] is None
        assert row["tpot_ms"] > 0
    code = main(["bench", "decode", "--model", "tiny", "--device", "cpu", "--lengths", "6", "--temperature", "0.8", "--top-p", "0.9",
                 "--min-p", "0.05", "--typical-p", "0.9", "--eta-cutoff", "1e-3", "--seed", "3", "--out-dir", str(out_dir / "filters")])
    assert code == 0, capsys.readouterr().err
    assert "sampled temperature 0.8, top_k 0, top_p 0.9, min_p 0.05, typical_p 0.9, eta_cutoff 0.001, seed 3" in capsys.readouterr().out


def test_bench_decode_mistakes_are_one_line_errors(tmp_path, capsys):
    base = ["bench", "decode", "--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert main([*base, "--lengths", "4", "--backends", "reference,fused9"]) == 1
    assert "unknown contender(s) fused9" in _one_line_error(capsys.readouterr().err)
    assert main([*base, "--lengths", "512"]) == 1
    assert "KV cache positions" in _one_line_error(capsys.readouterr().err)
    assert main([*base, "--lengths", "1"]) == 2
    for flag in ("--top-p", "--typical-p", "--eta-cutoff"):
        assert main([*base, "--lengths", "4", flag, "0.5"]) == 1
        assert "--temperature > 0" in _one_line_error(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_eval_without_lm_evaluation_harness_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "neoxfuse.evaluation", None)
    assert main(["eval", "--device", "cpu", "--model", "tiny", "--tasks", "lambada_openai"]) == 1
    error = _one_line_error(capsys.readouterr().err)
    assert "neoxfuse eval runs lm-evaluation-harness, which is not installed here" in error and "pip install 'lm-eval[hf]'" in error
