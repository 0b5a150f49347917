"""Evaluate a base model, optionally with a trained adapter, on one task of a held-out split.

    python recipes/evaluate.py --model taso-tiny --task math --limit 50
    python recipes/evaluate.py --model meta-llama/Llama-3.1-8B-Instruct --adapter out/taso --task code \
        --dataset mbpp --dataset_format mbpp --split test --output results/code.json

The split is rebuilt exactly as training built it (same dataset, format, validation_size and seed), so
`--split validation` is the held-out set the trainer never saw. Results: {"task", "metrics", "records"} as JSON.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from taso_llm.eval import run_evaluation
from taso_llm.eval.evaluate import completion_text, last_user_text, select_task
from taso_llm.tiny import resolve_model_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="taso-tiny", help="Base model: local path, hub id, or 'taso-tiny'.")
    p.add_argument("--adapter", default=None, help="Adapter directory (TASO or PEFT) to apply to the base model.")
    p.add_argument("--dataset", default="taso-tiny", help="Anything DataArguments.dataset_name accepts.")
    p.add_argument("--dataset_format", default="auto")
    p.add_argument("--validation_size", type=float, default=0.05, help="As in training (defines the held-out rows).")
    p.add_argument("--seed", type=int, default=42, help="The training seed (the held-out split depends on it).")
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--task", required=True, choices=["math", "code", "instruct"])
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N rows of the task.")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--num_fewshot", type=int, default=0, help="Math: worked examples taken from the train split.")
    p.add_argument("--no_chat_template", action="store_true", help="Plain-text prompts (base models).")
    p.add_argument("--with_nll", action="store_true", help="Math/code: also the reference answers' NLL.")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", help="results JSON (default: results_<task>.json beside --adapter, else in the current "
                                    "directory)")
    return p.parse_args(argv)


def load_model(model_name: str, adapter: str | None, dtype: str):
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    if adapter:
        model = apply_adapter(model, adapter)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def apply_adapter(model, adapter_dir: str):
    """The adapter (or training output) in `adapter_dir` on `model`: the method that wrote it loads it."""
    from taso_llm.methods import detect

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter_dir}: no adapter_config.json there")
    return detect(adapter_dir).load_for_eval(Path(adapter_dir), lambda path=None: model)


def load_split(args):
    # The data package is imported lazily: it is only needed here, not by the evaluation library.
    from taso_llm.data import DataArguments, load_sft_splits

    data_args = DataArguments(dataset_name=args.dataset, dataset_format=args.dataset_format,
                              validation_size=args.validation_size)
    return load_sft_splits(data_args, seed=args.seed)


def fewshot_examples(train, k: int) -> list[tuple[str, str]]:
    """The first k math rows of the train split as (question, worked answer) pairs: fixed, and never eval rows."""
    if k == 0:
        return []
    rows = select_task(train, "math", limit=k)
    if len(rows) < k:
        raise ValueError(f"--num_fewshot {k}: the train split has only {len(rows)} math rows")
    return [(last_user_text(r["prompt"]), completion_text(r["completion"])) for r in rows]


def main(argv=None):
    args = parse_args(argv)
    if args.num_fewshot and args.task != "math":
        raise SystemExit("--num_fewshot applies to --task math only")
    splits = load_split(args)
    model, tokenizer = load_model(args.model, args.adapter, args.dtype)
    opts = {"batch_size": args.batch_size}
    if args.task in ("math", "code"):
        opts.update(max_new_tokens=args.max_new_tokens, use_chat_template=not args.no_chat_template,
                    with_nll=args.with_nll)
    if args.task == "math":
        opts["fewshot"] = fewshot_examples(splits["train"], args.num_fewshot)
    if args.output is None:
        args.output = str(Path(args.adapter or ".") / f"results_{args.task}.json")
    result = run_evaluation(model, tokenizer, splits[args.split], args.task, args.output, limit=args.limit, **opts)
    print(json.dumps({"task": result["task"], **result["metrics"]}, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
