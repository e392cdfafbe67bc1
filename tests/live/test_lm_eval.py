"""lm-evaluation-harness against a live hearth on the default model (issue 16).

Runs `lm-eval run` with `local-completions` (a multiple-choice task scored by loglikelihood,
through `echo` + `logprobs`) and `local-chat-completions` (the same questions, generated), both on
the task shipped in tests/lm_eval/, offline. Then computes the same thing directly with
transformers on the same weights (the float32 checkpoint hearth converts the GGUF file to):
every loglikelihood within 1e-3, the same greedy flags and the same accuracy; every generated
answer equal to transformers' greedy `generate` on the chat template's prompt.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.server import DEFAULT_GGUF, ROOT, running_server

MODEL = "SmolLM2-135M-Instruct"
TASKS = ROOT / "tests" / "lm_eval"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live():
    with running_server("--autotune", "off") as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def reference() -> Any:
    """transformers' own model on the weights hearth serves (float32, from the GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hearth.engine.loading.gguf_cache import converted_checkpoint
    from hearth.engine.loading.sources import resolve_source

    path = converted_checkpoint(resolve_source(DEFAULT_GGUF).location, "float32")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def lm_eval(tmp_path: Path, task: str, model: str, model_args: dict[str, Any], *flags: str):
    """Run `lm-eval run` on one task; its samples (one dict per document) and its metrics."""
    out = tmp_path / task
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [
        *(sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args),
        *("--tasks", task, "--include_path", str(TASKS), "--output_path", str(out)),
        *("--log_samples", *flags),
    ]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {**os.environ, **offline, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [samples] = out.rglob(f"samples_{task}_*.jsonl")
    [results] = out.rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"][task]
    return [json.loads(line) for line in samples.read_text().splitlines()], metrics


def test_local_completions_loglikelihoods_equal_transformers(
    live: str, reference: Any, smollm_tokenizer_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoTokenizer

    model_args = {
        "model": MODEL,
        "base_url": f"{live}/completions",
        "tokenizer": smollm_tokenizer_dir,
        "tokenizer_backend": "huggingface",
        "num_concurrent": 4,
        "max_retries": 1,
    }
    samples, metrics = lm_eval(tmp_path, "hearth_capitals", "local-completions", model_args)
    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    assert len(samples) == 12
    correct = 0
    for sample in samples:
        scores = []
        for args, (served, served_greedy) in zip(
            sample["arguments"].values(), sample["filtered_resps"], strict=True
        ):
            # lm-eval's split: the continuation's tokens are the whole's past the context's
            context = tokenizer(args["arg_0"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(args["arg_0"] + args["arg_1"], add_special_tokens=False)["input_ids"]
            target = torch.tensor(whole[len(context) :])
            with torch.no_grad():
                logits = reference(torch.tensor([whole])).logits[0].double()
            rows = torch.log_softmax(logits, -1)[len(context) - 1 : len(whole) - 1]
            loglikelihood = rows[torch.arange(len(target)), target].sum().item()
            greedy = bool((rows.argmax(-1) == target).all())
            assert float(served) == pytest.approx(loglikelihood, abs=1e-3), args
            assert served_greedy == str(greedy), args
            scores.append(loglikelihood)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"]
    assert metrics["acc,none"] == pytest.approx(correct / len(samples))
    assert correct >= 3  # the model knows some capitals: the scores are not noise


def test_local_chat_completions_answers_equal_transformers_generate(
    live: str, reference: Any, smollm_tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    model_args = {
        "model": MODEL,
        "base_url": f"{live}/chat/completions",
        "num_concurrent": 4,
        "max_retries": 1,
    }
    samples, metrics = lm_eval(
        tmp_path, "hearth_capitals_chat", "local-chat-completions", model_args,
        "--apply_chat_template",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    correct = 0
    for sample in samples:
        [[served]] = sample["resps"]
        [messages] = sample["arguments"]["gen_args_0"]["arg_0"]
        ids = tokenizer.apply_chat_template(
            json.loads(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = reference.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=end)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answer = answer.split("\n")[0]  # the task's `until`
        assert served == answer, sample["doc"]
        city = re.search(r"is ([^.\n]+)", answer)
        correct += bool(city) and city.group(1).lower() == sample["target"].lower()
    assert metrics["exact_match,city"] == pytest.approx(correct / len(samples))
    assert correct >= 3
