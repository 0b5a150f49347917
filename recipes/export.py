"""Turn a trained adapter into what a serving stack wants (methods that can: see docs/methods.md).

    python recipes/export.py --adapter outputs/tiny-instruct-taso --peft out/peft_lora   # PEFT LoRA (vLLM, TGI, ...)
    python recipes/export.py --adapter outputs/tiny-instruct-taso --merged out/merged    # plain HF model

The base model is read from the adapter's config unless --base is given.
"""

import argparse
import json
import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from taso_llm.adapters.io import CONFIG_NAME
from taso_llm.loading import torch_dtype
from taso_llm.methods import detect
from taso_llm.tiny import resolve_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="directory with adapter_config.json (a training output_dir)")
    parser.add_argument("--base", help="base model id or path (default: the one the adapter was trained on)")
    parser.add_argument("--dtype", default="float32", help="dtype to load the base in for merging")
    parser.add_argument("--peft", help="write a PEFT LoRA adapter here")
    parser.add_argument("--merged", help="write the merged model (and tokenizer) here")
    args = parser.parse_args()
    if not (args.peft or args.merged):
        parser.error("nothing to do: give --peft and/or --merged")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = json.loads((Path(args.adapter) / CONFIG_NAME).read_text())
    base_id = args.base or config["base_model_name_or_path"]
    base_path = resolve_model_path(base_id)
    method = detect(args.adapter)
    if args.peft and not method.exports_peft_lora:
        parser.error(f"--peft: method={method.name} has no exact PEFT LoRA export")
    if args.merged and not method.mergeable:
        parser.error(f"--merged: method={method.name} adapters are not merged here (docs/methods.md)")
    model = method.load_for_eval(Path(args.adapter), lambda path=None: AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch_dtype(args.dtype)))
    if args.peft:
        info = method.export_peft(model, args.peft, base_id)
        print(f"PEFT LoRA adapter (r={info['r']}, {info['modules']} modules) -> {args.peft}")
    if args.merged:
        method.merge(model).save_pretrained(args.merged)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(args.merged)
        print(f"merged model -> {args.merged}")


if __name__ == "__main__":
    main()
