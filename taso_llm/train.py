"""Trainer construction: TRL's SFTTrainer with adapter-only checkpoints and a callback that records metrics.

Checkpoints of a sparse-adapter run hold only the adapter (indices + values), optimizer and scheduler state, not a
copy of the frozen base: `_save` writes the adapter and `_load_from_checkpoint` loads it back into the already
wrapped model when a run resumes.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from .adapters import iter_adapters
from .adapters.io import CONFIG_NAME, WEIGHTS_NAME, adapter_config, adapter_state, index_names, read_adapter
from .distributed import gathered_adapter_state
from .io import save_safetensors, write_json

log = logging.getLogger("taso_llm")


def peak_memory_bytes() -> dict:
    """Peak accelerator memory if there is one, and the process's peak resident memory."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                                   else 1024)}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


class MetricsCallback(TrainerCallback):
    """Keeps the loss curve and timing; the run writes them into metrics.json."""

    def __init__(self):
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.num_tokens = 0.0
        self.start = self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_losses.append((state.global_step, float(logs["eval_loss"])))
        if "num_tokens" in logs:
            self.num_tokens = float(logs["num_tokens"])

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def engine_info(trainer) -> dict:
    """Which engine really ran (accelerate silently falls back to plain DDP in some setups): for metrics.json."""
    acc = trainer.accelerator
    info = {"distributed_type": str(acc.distributed_type).rsplit(".", 1)[-1], "world_size": acc.num_processes}
    if trainer.is_deepspeed_enabled:
        info["zero_stage"] = acc.state.deepspeed_plugin.zero_stage
    return info


class AdapterSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints of a sparse-adapter model contain the adapter only."""

    def __init__(self, *args, base_model_id: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.base_model_id = base_model_id

    def _has_adapters(self) -> bool:
        return any(True for _ in iter_adapters(self.accelerator.unwrap_model(self.model)))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Gather only the adapter (not the Trainer's consolidated full model, which ZeRO-3 would build on every
        checkpoint) and write it from the main process."""
        if not self._has_adapters():
            return super().save_model(output_dir, _internal_call)
        state = gathered_adapter_state(self.accelerator.unwrap_model(self.model))
        self._save(output_dir, state_dict=state)  # adapter_state's format: `<module>.<tensor>`

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._has_adapters():
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        save_safetensors(state_dict or adapter_state(model), output_dir / WEIGHTS_NAME)
        write_json(output_dir / CONFIG_NAME, adapter_config(model, self.base_model_id))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._has_adapters():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        config, state = read_adapter(resume_from_checkpoint)
        for name, wrapper in iter_adapters(model):
            if name not in config["modules"]:
                raise ValueError(f"{resume_from_checkpoint}: checkpoint has no adapter for {name}")
            for key in index_names(wrapper.update):
                saved = state.get(f"{name}.{key}")
                if saved is None or not torch.equal(saved.long().cpu(), getattr(wrapper.update, key).cpu()):
                    raise ValueError(f"{resume_from_checkpoint}: {name}.{key} differ from this run's masks")
            with torch.no_grad():
                for key, param in wrapper.update.named_parameters():
                    if f"{name}.{key}" not in state:
                        raise ValueError(f"{resume_from_checkpoint}: checkpoint lacks {name}.{key} (incomplete "
                                         "checkpoint? delete it to resume from the one before)")
                    param.copy_(state[f"{name}.{key}"])
        log.info("resumed adapter values from %s", resume_from_checkpoint)


def _zero3_settings(model, training_args) -> None:
    """Under ZeRO-3 every weight is frozen and partitioned: non-reentrant checkpointing's recompute then disagrees
    with the gathered parameters, and with no trainable input nothing inside a checkpointed block would get a
    gradient. Reentrant checkpointing plus embedding outputs that require grad is the combination that works."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = {**(training_args.gradient_checkpointing_kwargs or {}),
                                                       "use_reentrant": True}
    model.enable_input_require_grads()


def build_trainer(model, tokenizer, train_dataset, eval_dataset, training_args, base_model_id: str,
                  callbacks=None) -> AdapterSFTTrainer:
    if getattr(model, "is_quantized", False):
        # transformers refuses a quantized model without adapters; ours are attached after importance,
        # before the optimizer exists, so declare them now.
        model._hf_peft_config_loaded = True
    _zero3_settings(model, training_args)
    return AdapterSFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, callbacks=callbacks, base_model_id=base_model_id)
