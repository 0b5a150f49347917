"""What bench_adapter_step.py measures: the benchmark model, its batches, and the variants built through the method
registry (the bench asks each method object how to reach a budget; it never builds an adapter itself).

A variant label reads `<method>@r<k>[/autograd][+compile]`:
  method      a registered method (taso, lora, ...) with `method.equal_budget(k)`: the trainable-parameter budget of a
              rank-k LoRA on the 7 projections; `floor` = nothing trains (every weight frozen, the embedding output
              requires grad, so backward still runs through the whole network): the cost every adapter pays anyway;
  /autograd   sparse updates through plain autograd instead of their fused Functions (the pre-fusion path);
  +compile    the model under torch.compile (inductor), eager otherwise.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass

import torch

SEED = 0
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LABEL = re.compile(r"^(?P<method>[a-z_0-9]+)(@r(?P<rank>\d+))?(?P<autograd>/autograd)?(?P<compile>\+compile)?$")


@dataclass(frozen=True)
class Variant:
    label: str
    method: str | None  # None: the frozen floor
    rank: int = 1
    autograd: bool = False
    compiled: bool = False

    @classmethod
    def parse(cls, label: str) -> "Variant":
        m = LABEL.match(label)
        if not m:
            raise ValueError(f"variant {label!r}: expected <method>@r<k>[/autograd][+compile] or floor[+compile]")
        method = None if m["method"] == "floor" else m["method"]
        if method is not None:
            from taso_llm.methods import METHODS

            if method not in METHODS:
                raise ValueError(f"variant {label!r}: method {method!r} is not one of {sorted(METHODS)}")
        return cls(label, method, int(m["rank"] or 1), bool(m["autograd"]), bool(m["compile"]))


def model_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                       max_position_embeddings=max(a.seq, a.calib_seq), tie_word_embeddings=False)


def dtype_of(a) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]


def build_base(a):
    """The same weights in every process: one seed, built from code (nothing downloaded). With `a.nf4` the linear
    layers are quantized to 4-bit nf4 (bitsandbytes) as `load_in_4bit` loads a real checkpoint."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config(a)).to(dtype_of(a))
    if a.nf4:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory(prefix="bench-nf4-") as tmp:
            model.save_pretrained(tmp)
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype_of(a), bnb_4bit_quant_storage=dtype_of(a))
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=dtype_of(a),
                                                         device_map=a.device)
    model = model.to(a.device) if not a.nf4 else model
    model.config.use_cache = False
    return model


def make_batch(a, batch: int, seq: int, seed: int, prompt_frac: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.vocab, (batch, seq), generator=g)
    labels = ids.clone().index_fill_(1, torch.arange(int(seq * prompt_frac)), -100)  # SFT: no loss on prompts
    return {k: t.to(a.device) for k, t in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)),
                                           ("labels", labels))}


def calibration_batches(a) -> list[dict]:
    return [make_batch(a, a.calib_batch, a.calib_seq, seed=100 + i, prompt_frac=0.5) for i in range(a.calib_batches)]


def build_variant(v: Variant, a) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, dict]:
    """(model, optimizer or None, the method's report) for one variant, from a fresh seeded base."""
    model = build_base(a)
    for p in model.parameters():
        p.requires_grad_(False)
    report: dict = {"trainable_params": 0}
    if v.method is None:
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    else:
        report = _prepare(v, a, model)
    if v.autograd:
        from taso_llm.adapters import iter_adapters

        for _, wrapper in iter_adapters(model):
            wrapper.update.fused = False  # this instance only: plain autograd through update(x)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    if v.compiled:
        model = torch.compile(model)
    return model, opt, report


def _prepare(v: Variant, a, model) -> dict:
    from trl import ModelConfig

    from taso_llm.config import MethodArguments
    from taso_llm.methods import RunContext, get_method

    method = get_method(v.method)
    budget = method.equal_budget(v.rank)
    if budget is None and v.rank != 1:
        raise ValueError(f"variant {v.label}: method {v.method} has no budget to set")
    budget = budget or {}
    shared = MethodArguments(method=v.method, target_modules=list(DEFAULT_TARGETS),
                             calibration_samples=a.calib_batches * a.calib_batch, calibration_batch_size=a.calib_batch,
                             **budget.get("shared", {}))
    own = method.args_class(**budget.get("own", {})) if method.args_class else None
    model_args = ModelConfig(model_name_or_path="bench", lora_dropout=0.0, lora_target_modules=list(DEFAULT_TARGETS),
                             **{"lora_r": 1, "lora_alpha": 2, **budget.get("model", {})})
    batches = calibration_batches(a)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
        ctx = RunContext(output_dir=out, model_id="bench", model_args=model_args, show_progress=False,
                         calibration=lambda: iter(batches), num_calibration_batches=len(batches), seed=SEED)
        report = method.prepare(model, shared, own, ctx).to_metrics()
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str)) and k != "masks_file"}


def train_step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    if opt is not None:  # floor: nothing to update
        opt.step()
        opt.zero_grad(set_to_none=True)


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# bf16 dense peak FLOP/s by device name fragment (vendor datasheets, no sparsity): for model FLOP utilisation.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(base_params: int, checkpointing: bool) -> float:
    """A frozen-base adapter step: forward (2N) + activation backward (2N); no weight gradients. 6N when activation
    checkpointing recomputes the forward."""
    return (6 if checkpointing else 4) * base_params
