"""Method registry: the `method:` name of a recipe → the module implementing it.

A method module provides `validate(args, shapes)`, `prepare(model, args, calibration, ...) -> report` (select /
estimate and wrap layers in place) and `save(model, output_dir, args, model_id)`. Adding a method is one new
module and one line here.
"""

from importlib import import_module

METHODS = {
    "taso": "taso_llm.methods.taso",
    "lora": "taso_llm.methods.lora",  # QLoRA: this with load_in_4bit
    "full": "taso_llm.methods.full",
}


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {sorted(METHODS)}")
    return import_module(METHODS[name])
