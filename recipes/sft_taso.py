"""Supervised fine-tuning with any method of the registry (TASO by default; `--method` chooses).

    accelerate launch recipes/sft_taso.py                                      # embedded tiny default, CPU, minutes
    accelerate launch recipes/sft_taso.py --config recipes/configs/llama-3.1-8b/instruct_taso.yaml
    accelerate launch recipes/sft_taso.py --config ... --budget rank2 --learning_rate 5e-4   # any field from the CLI
    accelerate launch recipes/sft_taso.py --method lora --lora_r 16                  # a baseline through the same path
"""

import sys
from pathlib import Path

from taso_llm.config import sft_parser
from taso_llm.distributed import configured_state_defaults, finish_distributed, init_distributed
from taso_llm.run import run_sft

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny" / "instruct_taso.yaml"


def main():
    if "--config" not in sys.argv:  # no config: the embedded default
        sys.argv[1:1] = ["--config", str(DEFAULT_CONFIG)]
    init_distributed()  # before the training arguments: on CPU they would set up a miscounting process group
    parser = sft_parser()  # data, shared method options, SFTConfig, ModelConfig, each method's own (taso_*, ...)
    parser.set_defaults(**configured_state_defaults())
    data_args, shared, training_args, model_args, *method_args = parser.parse_args_and_config()
    run_sft(data_args, shared, training_args, model_args, *method_args)
    finish_distributed()


if __name__ == "__main__":
    main()
