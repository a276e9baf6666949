"""neoxfuse.evaluation: lm-evaluation-harness's model "neoxfuse" against its own HF model (HFLM) on one checkpoint."""

import json
import shutil
import threading

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed here (requirements.txt installs it)")
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import CHAT_TEMPLATE

import neoxfuse.hf
from neoxfuse.cli import main
from neoxfuse.engine import Engine, ReferenceBackend
from neoxfuse.errors import InvalidInputError
from neoxfuse.evaluation import NeoxfuseLM
from neoxfuse.sampling import SamplingParams
from neoxfuse.scoring import CorpusScores
from neoxfuse.server import CompletionServer
from neoxfuse.weights import random_model

MAX_LENGTH = 16  # positions both models see: long requests are cut, texts span several windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, word_tokenizer):
    """A tiny random GPT-NeoX with a word tokenizer (end of text: id 0), saved as HF saves one."""
    directory = tmp_path_factory.mktemp("tiny-with-tokenizer")
    model = random_model("tiny", seed=3)
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(checkpoint):
    """(neoxfuse's, lm_eval's HFLM) on the checkpoint, both fp32 on the CPU, seeing MAX_LENGTH positions."""
    return (NeoxfuseLM(pretrained=checkpoint, device="cpu", max_length=MAX_LENGTH),
            HFLM(pretrained=checkpoint, device="cpu", batch_size=1, max_length=MAX_LENGTH))


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def _words(numbers) -> str:
    return " ".join(f"w{n}" for n in numbers)


def test_loglikelihoods_are_hfs(models):
    # A continuation of one token and of several; an empty context (the end-of-text token stands in);
    # a context's trailing space moved to the continuation; a context cut to fit; the continuation
    # the model itself would choose (greedy: True).
    ours, hf = models
    greedy = ours.engine.generate("hello world w7", 2).text
    pairs = [("hello world w7", " w12 w3"), ("", "w5 w6"), ("hello ", "world"), (_words(range(3, 40)), " w9 w10"),
             ("hello world w7", greedy), ("w9", " w9")]
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = hf.loglikelihood(_requests("loglikelihood", pairs))
    assert [flag for _, flag in got] == [flag for _, flag in want] and got[4][1] and not got[0][1]
    assert [logprob for logprob, _ in got] == pytest.approx([logprob for logprob, _ in want], abs=1e-4)
    context = ours.engine.loglikelihood(ours.tok_encode(_words(range(3, 40))), ours.tok_encode(" w9 w10"))
    assert context.context_tokens == MAX_LENGTH + 1 - 2  # the first 37 - 15 context tokens cut


def test_rolling_loglikelihoods_are_hfs(models):
    # One window, one of exactly MAX_LENGTH tokens, and several (the last one shorter): every token
    # scored after the end-of-text token, as HFLM's rolling windows score them.
    ours, hf = models
    texts = ["w5", _words(range(3, 3 + MAX_LENGTH)), _words((7 * i) % 300 + 3 for i in range(40))]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,) for text in texts]))
    want = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,) for text in texts]))
    assert got == pytest.approx(want, rel=1e-5)
    every = ours.engine.score(ours.tok_encode(texts[2]), prefix_token=0)
    assert got[2] == -float(every.nll.sum()) and every.windows == 3


def test_greedy_generations_are_hfs(models):
    # Until a text that comes at once (an empty answer), until one that comes later, only the end of
    # text, a context cut to leave room for max_gen_toks, a repetition penalty and an n-gram ban
    # (which change what this repetitive model says), and lm_eval's temperature-0 rule (greedy).
    ours, hf = models
    plain = ours.engine.generate("hello world w7", 10).text.split()
    gen = {"max_gen_toks": 10, "do_sample": False}
    requests = [("hello world w7", {**gen, "until": [plain[0]]}),
                ("hello world w7", {**gen, "until": ["\n", f"{plain[0]} {plain[1]}"], "repetition_penalty": 0.7}),
                ("hello w12", gen), (_words(range(3, 30)), {**gen, "max_gen_toks": 5}),
                ("hello world w7", {**gen, "repetition_penalty": 1.5}),
                ("hello world w7", {**gen, "no_repeat_ngram_size": 1}),
                ("w9 w9", {"until": ["w3"], "temperature": 0.0, "max_gen_toks": 8})]
    got = ours.generate_until(_requests("generate_until", requests))
    want = hf.generate_until(_requests("generate_until", requests))
    assert got == want
    assert got[0] == "" and got[4] != " ".join(plain) and len(set(got[5].split())) == 10


def test_lm_evals_hf_model_runs_on_the_engine_with_its_model_generate_patched(checkpoint, models, monkeypatch):
    # lm_eval's own HFLM calls model.generate with its stopping criteria (its stop sequences, which
    # keep state per row): patched, the Engine makes HFLM's generations, and they are the same.
    hf = models[1]
    patched = HFLM(pretrained=checkpoint, device="cpu", batch_size=1, max_length=MAX_LENGTH)
    neoxfuse.hf.patch_generate(patched.model)
    plain = models[0].engine.generate("hello world w7", 10).text.split()
    runs = []
    engine_generate = Engine.generate

    def counted(self, *args, **kwargs):
        runs.append(self.backend_name)
        return engine_generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted)
    gen = {"max_gen_toks": 10, "do_sample": False}
    requests = [("hello world w7", {**gen, "until": [plain[1]]}), ("hello w12", gen),
                ("w9 w9", {"until": ["w3", f"{plain[0]} {plain[1]}"], "temperature": 0.0, "max_gen_toks": 8})]
    got = patched.generate_until(_requests("generate_until", requests))
    assert got == hf.generate_until(_requests("generate_until", requests)) and runs == ["reference"] * 3
    assert len(got[0].split()) < 10 and len(got[1].split()) == 10  # the first ended at its stop sequence


def test_generations_end_at_the_generation_configs_end_of_text_tokens_as_hfs(checkpoint, models, tmp_path):
    # A chat model's generation_config.json may list its end-of-turn token: HF's model.generate (and
    # so lm_eval's HF model) ends there, and so does neoxfuse.
    plain = models[0].engine.generate("hello w12", 10).tokens
    end = next(token for token in plain[2:] if token not in plain[:2])
    shutil.copytree(checkpoint, tmp_path / "chat")
    (tmp_path / "chat" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end]}))
    ours = NeoxfuseLM(pretrained=str(tmp_path / "chat"), device="cpu", max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(tmp_path / "chat"), device="cpu", batch_size=1, max_length=MAX_LENGTH)
    requests = _requests("generate_until", [("hello w12", {"until": ["\n"], "max_gen_toks": 10, "do_sample": False})])
    got = ours.generate_until(requests)
    assert got == hf.generate_until(requests) != models[0].generate_until(requests)
    assert got[0].split()[-1] == models[0].tokenizer.decode([end])


def test_sampled_generations_draw_with_seed_zero(models):
    ours = models[0]
    request = ("hello world w7", {"until": ["hello"], "max_gen_toks": 12, "do_sample": True, "temperature": 0.9, "top_k": 40})
    got = ours.generate_until(_requests("generate_until", [request, request]))
    out = ours.engine.generate("hello world w7", 12, SamplingParams(temperature=0.9, top_k=40, seed=0), stop_token_ids=0,
                               stop=["hello"])
    assert got == [out.text.split("hello")[0]] * 2 and len(set(got[0].split())) > 2
    filtered = ("hello world w7", {**request[1], "top_p": 0.9, "typical_p": 0.8, "epsilon_cutoff": 1e-3, "eta_cutoff": 2e-3})
    got = ours.generate_until(_requests("generate_until", [filtered]))
    rule = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, typical_p=0.8, epsilon_cutoff=1e-3, eta_cutoff=2e-3, seed=0)
    assert got == [ours.engine.generate("hello world w7", 12, rule, stop_token_ids=0, stop=["hello"]).text.split("hello")[0]]


def test_lm_evals_local_completions_model_gets_neoxfuse_serves_answers(checkpoint, models):
    # lm_eval's OpenAI-API client against `neoxfuse serve`'s server: it finds the tokenizer routes and
    # tokenizes through them, asks loglikelihoods as one prompt with echo and logprobs, generations
    # with stop strings; the answers of its model "neoxfuse" on the same checkpoint.
    api_models = pytest.importorskip("lm_eval.models.openai_completions", reason="lm-eval[api] is not installed here "
                                     "(requirements.txt installs it)")

    ours = models[0]
    server = CompletionServer(Engine(checkpoint, device="cpu", max_seq_len=MAX_LENGTH), ("127.0.0.1", 0), "tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = api_models.LocalCompletionsAPI(model="tiny", base_url=f"{server.url}/v1/completions", max_length=MAX_LENGTH + 1)
        assert api.tokenizer_backend == "remote"
        greedy = ours.engine.generate("hello world w7", 2).text
        pairs = [("hello world w7", " w12 w3"), ("", "w5 w6"), ("hello world w7", greedy), ("w9", " w9")]
        got = api.loglikelihood(_requests("loglikelihood", pairs))
        want = ours.loglikelihood(_requests("loglikelihood", pairs))
        assert [flag for _, flag in got] == [flag for _, flag in want] and got[2][1] and not got[0][1]
        assert [logprob for logprob, _ in got] == pytest.approx([logprob for logprob, _ in want], abs=1e-4)
        plain = ours.engine.generate("hello world w7", 8).text.split()
        requests = [("hello world w7", {"until": [plain[2]], "max_gen_toks": 8, "do_sample": False}),
                    ("w9 w9", {"until": ["w3"], "temperature": 0.0, "max_gen_toks": 8})]
        assert api.generate_until(_requests("generate_until", requests)) == ours.generate_until(_requests("generate_until", requests))
    finally:
        server.shutdown()
        server.server_close()


def test_lm_evals_local_chat_completions_model_gets_neoxfuse_serves_chat_answers(checkpoint):
    # lm_eval's chat client (its generations for chat-templated tasks) against the server's chat
    # route: the assistant's text the Engine generates from the rendered messages, cut at the stop.
    api_models = pytest.importorskip("lm_eval.models.openai_completions", reason="lm-eval[api] is not installed here "
                                     "(requirements.txt installs it)")
    from lm_eval.models.api_models import JsonChatStr

    engine = Engine(checkpoint, device="cpu", max_seq_len=MAX_LENGTH)
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w6{% endif %}"
    server = CompletionServer(engine, ("127.0.0.1", 0), "tiny", chat_template=template)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = api_models.LocalChatCompletion(model="tiny", base_url=f"{server.url}/v1/chat/completions")
        plain = engine.generate("w9 w10 w6", 8).text.split()
        chat = JsonChatStr(json.dumps([{"role": "user", "content": "w9"}, {"role": "user", "content": "w10"}]))
        got = api.generate_until(_requests("generate_until", [(chat, {"until": [plain[3]], "max_gen_toks": 8, "do_sample": False})]))
        assert got == [engine.generate("w9 w10 w6", 8, stop=[plain[3]], stop_token_ids=0).text.split(plain[3])[0]]
        assert got[0].split() == plain[:3]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"num_beams": 2}, r"generate_until options \['num_beams'\] are not implemented by neoxfuse"),
    ({"do_sample": True, "temperature": 0.0}, "do_sample with temperature 0"),
    ({"max_gen_toks": MAX_LENGTH}, "max_gen_toks must be from 1 to the model's 16 positions minus one"),
])  # fmt: skip
def test_generation_options_it_does_not_implement_are_refused(models, gen_kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        models[0].generate_until(_requests("generate_until", [("hello", {"until": [], "max_gen_toks": 5, **gen_kwargs})]))


def test_a_model_without_a_tokenizer_is_refused(tmp_path):
    random_model("tiny", seed=1).save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="lm_eval's requests are text: .* needs a tokenizer"):
        NeoxfuseLM(pretrained=str(tmp_path), device="cpu")


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """(folder of two task YAMLs on a local JSON Lines file, its documents): local_rolling, a
    wikitext-like rolling perplexity, and local_choice, a multiple choice."""
    folder = tmp_path_factory.mktemp("tasks")
    documents = [{"text": f"hello w{i} world {_words(range(i, 3 * i))}", "choices": ["w5", "w6 w7"], "gold": i % 2}
                 for i in range(3, 9)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(document) + "\n" for document in documents))
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              f"  cache_dir: {folder / 'datasets'}\ntest_split: test\n")
    (folder / "rolling.yaml").write_text(f"task: local_rolling\n{source}output_type: loglikelihood_rolling\n"
                                         'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                         "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "choice.yaml").write_text(f"task: local_choice\n{source}output_type: multiple_choice\n"
                                        'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
                                        "metric_list:\n  - metric: acc\n")
    return folder, documents


def _evaluate(model: str, checkpoint: str, folder, **options) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=f"pretrained={checkpoint},device=cpu,dtype=auto,max_length={MAX_LENGTH}",
                                   tasks=["local_rolling", "local_choice"], log_samples=False,
                                   task_manager=TaskManager(include_path=str(folder), include_defaults=False), **options)["results"]


def _same_metrics(ours: dict, hf: dict) -> None:
    for name in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["local_rolling"][name] == pytest.approx(hf["local_rolling"][name], rel=1e-5)
    assert ours["local_choice"]["acc,none"] == hf["local_choice"]["acc,none"]


def test_simple_evaluate_runs_tasks_through_neoxfuse_as_through_hf(checkpoint, local_tasks):
    # lm_eval's own entry point, model "neoxfuse" by name: the same metrics as its HF model. The
    # corpus's word perplexity is also neoxfuse.scoring's (CorpusScores, as `perplexity --documents`
    # sums it).
    folder, documents = local_tasks
    ours = _evaluate("neoxfuse", checkpoint, folder)
    _same_metrics(ours, _evaluate("hf", checkpoint, folder))
    engine = Engine(checkpoint, device="cpu", max_seq_len=MAX_LENGTH)
    texts = [document["text"] for document in documents]
    corpus = CorpusScores(tuple(engine.score(text, prefix_token=0) for text in texts))
    assert corpus.text_measures(texts).word_perplexity == pytest.approx(ours["local_rolling"]["word_perplexity,none"], rel=1e-9)


# conftest's CHAT_TEMPLATE, refusing system turns.
STRICT_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                        "{% endfor %}" + CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, word_tokenizer):
    """checkpoint's model and word tokenizer, the tokenizer with CHAT_TEMPLATE."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    model = random_model("tiny", seed=3)
    model.save_pretrained(directory)
    tokenizer = word_tokenizer(model.config.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_chat_templated_tasks_score_as_through_hf(chat_checkpoint, local_tasks, monkeypatch, tmp_path):
    # lm_eval's apply_chat_template: neoxfuse renders the turns as its HFLM does (the assistant's
    # turn opened, or the last message continued; a template that refuses system turns gets none),
    # and the tasks' metrics are HF's.
    ours, hf = (NeoxfuseLM(pretrained=chat_checkpoint, device="cpu"), HFLM(pretrained=chat_checkpoint, device="cpu", batch_size=1))
    history = [{"role": "system", "content": "w20"}, {"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": "w11"}]
    assert ours.apply_chat_template(history[:2]) == hf.apply_chat_template(history[:2]) == "w3 w20 w4 w9 w10 w6 "
    assert ours.apply_chat_template(history, False) == hf.apply_chat_template(history, False) == "w3 w20 w4 w9 w10 w5 w11"
    assert ours.tokenizer_name == hf.tokenizer_name
    for lm in (ours, hf):
        monkeypatch.setattr(lm.tokenizer, "chat_template", STRICT_CHAT_TEMPLATE)
    assert ours.apply_chat_template(history[:2]) == hf.apply_chat_template(history[:2]) == "w4 w9 w10 w6 "
    monkeypatch.undo()

    folder, _ = local_tasks
    rendered, render = [], NeoxfuseLM.apply_chat_template
    monkeypatch.setattr(NeoxfuseLM, "apply_chat_template",
                        lambda lm, *args, **kwargs: rendered.append(render(lm, *args, **kwargs)) or rendered[-1])
    ours = _evaluate("neoxfuse", chat_checkpoint, folder, apply_chat_template=True)
    assert rendered and all(text.endswith(" w6 ") for text in rendered)  # each question as the user's turn
    _same_metrics(ours, _evaluate("hf", chat_checkpoint, folder, apply_chat_template=True))
    out_file, before = tmp_path / "eval.json", len(rendered)
    assert main(["eval", "--device", "cpu", "--model", chat_checkpoint, "--max-length", str(MAX_LENGTH), "--include-path", str(folder),
                 "--tasks", "local_rolling,local_choice", "--apply-chat-template", "--out", str(out_file)]) == 0
    assert sorted(rendered[before:]) == sorted(rendered[:before])  # the command rendered the same contexts
    _same_metrics(json.loads(out_file.read_text())["neoxfuse"], ours)


def test_a_questions_choices_share_one_prefill_of_its_context(checkpoint, local_tasks, monkeypatch):
    # lm_eval asks a multiple-choice question's choices one after another with the same context
    # tokens: no context is prefilled twice (12 requests; the long questions' contexts, cut from
    # the left to fit with each choice, differ between their choices).
    folder, documents = local_tasks
    prefills, prefill = [], ReferenceBackend.prefill

    def counted(backend, tokens, cache):
        prefills.append(tokens.tolist())
        return prefill(backend, tokens, cache)

    monkeypatch.setattr(ReferenceBackend, "prefill", counted)
    lm_eval.simple_evaluate(model="neoxfuse", model_args=f"pretrained={checkpoint},device=cpu,max_length={MAX_LENGTH}",
                            tasks=["local_choice"], log_samples=False,
                            task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    assert len(documents) <= len(prefills) == len({tuple(tokens) for tokens in prefills}) < 2 * len(documents)


def test_the_eval_command_prints_and_saves_both_tables(checkpoint, local_tasks, tmp_path, capsys):
    folder, _ = local_tasks
    args = ["eval", "--device", "cpu", "--model", checkpoint, "--max-length", str(MAX_LENGTH), "--include-path", str(folder)]
    out_file = tmp_path / "eval.json"
    assert main([*args, "--tasks", "local_rolling,local_choice", "--compare-hf", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    results = json.loads(out_file.read_text())
    _same_metrics(results["neoxfuse"], results["hf"])
    _same_metrics(results["neoxfuse"], _evaluate("neoxfuse", checkpoint, folder))
    assert "neoxfuse (reference):" in out and "HF transformers" in out and out.count("local_rolling") == 2
    assert main([*args, "--tasks", "local_choice,no_such_task"]) == 1
    assert "unknown lm-evaluation-harness tasks ['no_such_task']" in capsys.readouterr().err
    assert main(["eval", "--device", "cpu", "--model", "tiny", "--tasks", "local_choice", "--include-path", str(folder)]) == 1
    assert "lm_eval's requests are text: tiny (random-initialised) needs a tokenizer" in capsys.readouterr().err
    assert main([*args, "--tasks", "local_choice", "--apply-chat-template"]) == 1
    assert "--apply-chat-template: the tokenizer of " in capsys.readouterr().err
