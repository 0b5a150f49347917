"""Evaluate one trained run of the comparison on its task's test rows (run as a subprocess by runs.py):

    python -m taso_llm.compare.evaluation <run_dir>/eval_spec.json      # writes <run_dir>/eval.json

Every task gets the answer-token NLL of the reference completions (it separates methods when exact match is all
zeros) and its task metric: math strict + flexible exact match, code pass@1 in the sandbox, instruct the exact-format
checker `synthetic.check_instruct` when the rows carry an `answer` (generated data) else the NLL alone.
`score` is the headline number: strict match / pass@1 / checker accuracy (higher is better), or -NLL.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from taso_llm.io import write_json


def load_trained(run_dir: Path, base_model: str, model_fields: dict):
    """The base as the run loaded it (dtype, 4-bit) with what the run trained on it: the method that wrote the run
    directory knows how (methods.detect)."""
    import torch
    from trl import ModelConfig

    from taso_llm.loading import load_model_and_tokenizer
    from taso_llm.methods import detect

    tokenizer = None

    def load_base(path: str | None = None):
        nonlocal tokenizer
        base, tok = load_model_and_tokenizer(ModelConfig(model_name_or_path=path or base_model, **model_fields))
        tokenizer = tokenizer or tok
        return base

    model = detect(run_dir).load_for_eval(run_dir, load_base)
    model.eval()
    model.config.use_cache = True
    if torch.cuda.is_available() and not model_fields.get("load_in_4bit"):
        model = model.to("cuda")
    return model, tokenizer


def load_test(test: dict, standard: bool):
    """The test rows in the layout training used: chat messages, or plain text (standard) rows."""
    from taso_llm.data.loading import SourceSpec, load_converted

    spec = SourceSpec(test["dataset_name"], test["dataset_name"], test["format"], test["split"],
                      test.get("dataset_config"), None, 1.0)
    return load_converted(spec, test["split"], standard=standard)


def instruct_checker(dataset):
    """A judge for evaluate_instruct: 1.0 when the response equals the row's single correct answer."""
    from taso_llm.data.synthetic import check_instruct

    answers = {json.dumps(row["prompt"]): row for row in dataset}

    def judge(prompt, response):
        return float(check_instruct(answers[json.dumps(prompt)], response))

    return judge


def evaluate_run(spec: dict) -> dict:
    from taso_llm.data.standard import use_conversational
    from taso_llm.eval import answer_nll, run_evaluation
    from taso_llm.eval.evaluate import select_task

    run_dir, task, opts = Path(spec["run_dir"]), spec["task"], spec["eval"]
    start = time.perf_counter()
    model, tokenizer = load_trained(run_dir, spec["base_model"], spec["model_fields"])
    # the run's own resolution of prompt_format (auto: the chat template when the tokenizer has one)
    standard = not use_conversational(spec.get("prompt_format", "auto"), tokenizer)
    rows = select_task(load_test(spec["test"], standard), task, spec.get("limit"))
    bs = opts["batch_size"]
    if task == "instruct":
        has_answers = any(rows["answer"])
        result = run_evaluation(model, tokenizer, rows, task, batch_size=bs, max_new_tokens=opts["max_new_tokens"],
                                use_chat_template=not standard,
                                judge=instruct_checker(rows) if has_answers else None)
        metrics = {"answer_nll": result["metrics"]["loss"], **result["metrics"]}
        if has_answers:
            metrics["format_accuracy"] = metrics.pop("judge_mean")
        score_key = "format_accuracy" if has_answers else None
    else:
        extra = {"timeout_s": opts["timeout_s"]} if task == "code" else {}
        result = run_evaluation(model, tokenizer, rows, task, batch_size=bs, max_new_tokens=opts["max_new_tokens"],
                                use_chat_template=not standard,
                                with_nll=True, **extra)
        metrics = dict(result["metrics"])
        score_key = "strict_match" if task == "math" else "pass@1"
    if "answer_nll" not in metrics:  # defensive: every task reports the answer NLL
        metrics["answer_nll"] = answer_nll(model, tokenizer, rows, batch_size=bs)["metrics"]["nll"]
    metrics["score"] = metrics[score_key] if score_key else -metrics["answer_nll"]
    metrics["score_name"] = score_key or "-answer_nll"
    out = {"task": task, "metrics": metrics, "eval_seconds": time.perf_counter() - start,
           "records": result["records"][:20]}  # a sample of what the model wrote; the metrics cover all rows
    write_json(run_dir / "eval.json", out)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m taso_llm.compare.evaluation <eval_spec.json>")
    result = evaluate_run(json.loads(Path(argv[0]).read_text()))
    print(json.dumps({k: v for k, v in result["metrics"].items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
