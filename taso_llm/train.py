"""Trainer construction: TRL's SFTTrainer with adapter-only checkpoints and a callback that records metrics.

Checkpoints of a sparse-adapter run hold only the adapter (indices + values), optimizer and scheduler state, not a
copy of the frozen base: `_save` writes the adapter and `_load_from_checkpoint` loads it back into the already
wrapped model when a run resumes. Every checkpoint (any method) is written under a temporary name and renamed when
complete (`_save_checkpoint`), and carries the run's history so far (HISTORY_NAME) for the resumed run's metrics.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from .adapters import iter_adapters
from .adapters.io import (CONFIG_NAME, WEIGHTS_NAME, adapter_config, adapter_state, gathered_adapter_state, index_names,
                          read_adapter)
from .io import save_safetensors, write_json
from .outputs import PARTIAL_CHECKPOINTS, TRAINER_STATE, move_into_place
from .preemption import workers_ignore_sigterm

log = logging.getLogger("taso_llm")
HISTORY_NAME = "run_history.json"  # in each checkpoint: MetricsCallback.history()


def peak_memory_bytes() -> dict:
    """Peak accelerator memory if there is one, and the process's peak resident memory."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                                   else 1024)}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


class MetricsCallback(TrainerCallback):
    """Keeps the loss curves, tokens, timing and the method's report; the run writes them into metrics.json. Each
    checkpoint carries a copy (`history`), which a resumed run starts from (`resume_from`): its metrics.json and
    training.png then cover the whole run, not only the last segment."""

    def __init__(self):
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.num_tokens = 0.0
        self.start = self.seconds = 0.0
        self.earlier_seconds = 0.0  # training time of the segments before a resume
        self.report: dict = {}  # the method's Report as {"metrics", "layers"}: what was selected, and how
        self.resumed_from: list[str] = []

    def keep_report(self, report) -> None:
        """The report of the method's prepare. A resumed run keeps the one its checkpoint carried: the selection
        (importance time, captured shares) happened in the first segment; a resume only reloads the masks."""
        if not self.report:
            self.report = {"metrics": report.to_metrics(), "layers": report.layers}

    def history(self) -> dict:
        return {"losses": self.losses, "eval_losses": self.eval_losses, "num_tokens": self.num_tokens,
                "seconds": self.earlier_seconds + time.perf_counter() - self.start, "report": self.report,
                "resumed_from": self.resumed_from}

    def resume_from(self, checkpoint: str) -> None:
        path = Path(checkpoint) / HISTORY_NAME
        if not path.is_file():
            log.warning("%s has no %s (written by an older version): metrics.json will cover the resumed part only",
                        checkpoint, HISTORY_NAME)
        else:
            saved = json.loads(path.read_text())
            self.losses = [tuple(x) for x in saved["losses"]]
            self.eval_losses = [tuple(x) for x in saved["eval_losses"]]
            self.num_tokens, self.earlier_seconds = saved["num_tokens"], saved["seconds"]
            self.report, self.resumed_from = saved["report"], saved["resumed_from"]
        self.resumed_from = [*self.resumed_from, str(checkpoint)]

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
        self.seconds = self.earlier_seconds + time.perf_counter() - self.start


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
        self._staging_root: str | None = None  # while a checkpoint is written: where (see _save_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def get_train_dataloader(self):
        return workers_ignore_sigterm(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return workers_ignore_sigterm(super().get_eval_dataloader(eval_dataset))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint flow (TRL's model card, weights, optimizer/scheduler or DeepSpeed/FSDP state,
        RNG state of every rank, trainer_state.json) run into `.partial-checkpoints/checkpoint-N`; the directory
        gets its final name only when every rank is done, so a save cut short (full disk, kill) never looks like a
        checkpoint to resume from. Rotation then runs on the complete checkpoints."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / PARTIAL_CHECKPOINTS, run_dir / name
        if self.args.should_save and (staging / name).exists():  # an earlier save of this step, cut short
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if self.args.should_save:
            if self.state.best_model_checkpoint == str(staging / name):  # the Trainer named the staged path
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staging / name / TRAINER_STATE))
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, MetricsCallback):
                    write_json(staging / name / HISTORY_NAME, cb.history())
        self.accelerator.wait_for_everyone()  # every rank's files are in
        if self.args.should_save and (staging / name).exists():  # (another node may have renamed a shared one)
            move_into_place(staging / name, final)
            try:
                staging.rmdir()  # only if empty
            except OSError:
                pass
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL names the base model after `config._name_or_path`, which here is the local directory the model was
        loaded from (a resolved snapshot), and then writes "None"; name the model the run was asked for."""
        config = self.accelerator.unwrap_model(self.model).config
        loaded_from, config._name_or_path = config._name_or_path, self.base_model_id or config._name_or_path
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            config._name_or_path = loaded_from

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
            unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
            if getattr(unwrapped, "_hf_peft_config_loaded", False) and hasattr(unwrapped, "peft_config"):
                return _load_integrated_peft_adapter(unwrapped, resume_from_checkpoint)
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


def _load_integrated_peft_adapter(model, checkpoint: str) -> None:
    """PEFT adapters added with transformers' `model.add_adapter` (the LoRA baselines): the Trainer's own resume only
    knows PeftModel wrappers and looks for full-model weights here, so the adapter values are put back directly."""
    from peft.utils import set_peft_model_state_dict

    from .io import load_safetensors

    state = load_safetensors(Path(checkpoint) / "adapter_model.safetensors", what="checkpoint adapter weights",
                             fix="delete this checkpoint to resume from the one before")
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{checkpoint}: checkpoint lacks adapter tensors {missing[:3]}")
    log.info("resumed PEFT adapter values from %s", checkpoint)


def _zero3_settings(model, training_args) -> None:
    """Under ZeRO-3 every weight is frozen and partitioned: non-reentrant checkpointing's recompute then disagrees
    with the gathered parameters, and with no trainable input nothing inside a checkpointed block would get a
    gradient. Reentrant checkpointing plus embedding outputs that require grad is the combination that works."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    if training_args.gradient_checkpointing:
        reentrant = {**(training_args.gradient_checkpointing_kwargs or {}), "use_reentrant": True}
        training_args.gradient_checkpointing_kwargs = reentrant
        if hasattr(training_args, "activation_checkpointing_kwargs"):
            # transformers >= 5.2x: the Trainer reads the new name, which the old one mirrored only at __post_init__
            # (set alone after that, it silently left non-reentrant checkpointing on)
            training_args.activation_checkpointing_kwargs = dict(reentrant)
    model.enable_input_require_grads()


def build_trainer(model, tokenizer, train_dataset, eval_dataset, training_args, base_model_id: str,
                  callbacks=None) -> AdapterSFTTrainer:
    if getattr(model, "is_quantized", False):
        # transformers refuses a quantized model without adapters; ours are attached after importance,
        # before the optimizer exists, so declare them now.
        model._hf_peft_config_loaded = True
    _zero3_settings(model, training_args)
    trainer = AdapterSFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks,
                                base_model_id=base_model_id)
    for cb in callbacks or []:
        if isinstance(cb, MetricsCallback) and cb.resumed_from:
            # TRL's logged `num_tokens` counts from 0 in every process and is not in the checkpoint: continue it
            trainer._total_train_tokens = cb.num_tokens
    return trainer
