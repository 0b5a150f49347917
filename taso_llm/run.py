"""One SFT run, start to finish: validate → data → model → trainer → method.prepare → train → outputs.

`recipes/sft_taso.py` parses the four argument dataclasses and calls `run_sft`; everything it does is here, in
the order it happens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import PartialState

from .calibration import calibration_batches, num_calibration_batches
from .config import TasoArguments
from .data import DataArguments, apply_length_policy, load_sft_splits
from .export import standalone_model
from .io import write_json
from .loading import load_model_and_tokenizer, target_shapes
from .methods import get_method
from .methods.taso import MASKS_FILE
from .plots import plot_run
from .tiny import resolve_model_path
from .distributed import gathered_adapter_state
from .train import MetricsCallback, build_trainer, engine_info, peak_memory_bytes

log = logging.getLogger("taso_llm")


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_main else logging.WARNING)


def _resume_masks(taso_args: TasoArguments, training_args) -> None:
    """A resumed run reuses the masks it chose the first time (never re-estimates: the data order may differ)."""
    saved = Path(training_args.output_dir) / MASKS_FILE
    if training_args.resume_from_checkpoint and not taso_args.masks_path:
        if not saved.is_file():
            raise FileNotFoundError(f"resume_from_checkpoint is set but {saved} does not exist; "
                                    "cannot rebuild the adapter structure this run was trained with")
        taso_args.masks_path = str(saved)


def _resolve_checkpoint(value):
    """`--resume_from_checkpoint true` means the latest checkpoint in output_dir (as in HF examples)."""
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    return value


def run_sft(data_args: DataArguments, taso_args: TasoArguments, training_args, model_args) -> dict:
    state = PartialState()
    setup_logging(state.is_main_process)
    model_id = model_args.model_name_or_path
    model_path = resolve_model_path(model_id)
    method = get_method(taso_args.method)
    training_args.resume_from_checkpoint = _resolve_checkpoint(training_args.resume_from_checkpoint)
    _resume_masks(taso_args, training_args)

    # Cheap checks first: names and shapes from a weightless copy, then data validation.
    shapes = target_shapes(model_path, taso_args.target_modules, model_args.model_revision)
    method.validate(taso_args, shapes, model_args)
    splits = load_sft_splits(data_args, seed=training_args.seed)

    model, tokenizer = load_model_and_tokenizer(model_args)
    max_length = training_args.max_length
    train_ds, length_stats = apply_length_policy(splits["train"], tokenizer, max_length, data_args.max_length_policy)
    eval_ds = splits["validation"] if len(splits["validation"]) else None

    metrics_cb = MetricsCallback()
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, training_args, base_model_id=model_id,
                            adapter_alpha=taso_args.alpha, callbacks=[metrics_cb])
    n_batches = num_calibration_batches(len(trainer.train_dataset), taso_args.calibration_samples,
                                        taso_args.calibration_batch_size)
    calibration = lambda: calibration_batches(  # noqa: E731 (read lazily: skipped when masks are reused)
        trainer.train_dataset, trainer.data_collator, taso_args.calibration_samples,
        taso_args.calibration_batch_size, rank=state.process_index, world_size=state.num_processes)
    report = method.prepare(trainer.model, taso_args, calibration, n_batches, training_args.output_dir, model_id,
                            is_main=state.is_main_process, model_args=model_args)
    base_lr = training_args.learning_rate
    trainer.args.learning_rate = base_lr * report.get("lr_multiplier", 1.0)

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    out = Path(training_args.output_dir)
    own_format = hasattr(method, "save")  # TASO writes its own adapter format; baselines save as the Trainer does
    if own_format:
        adapter = gathered_adapter_state(trainer.accelerator.unwrap_model(trainer.model))  # collective: all ranks
        if state.is_main_process:
            method.save(trainer.model, out, taso_args, model_id, state=adapter)
    else:
        trainer.save_model(str(out))
    metrics = {"method": taso_args.method, "model": model_id, **engine_info(trainer),
               **_metrics(report, result, metrics_cb, trainer, base_lr, length_stats, len(train_ds))}
    if eval_ds is not None:  # every rank: evaluation gathers losses across ranks
        metrics["eval_loss"] = trainer.evaluate().get("eval_loss")
    if state.is_main_process:
        _extra_outputs(standalone_model(trainer.model, out, model_args) if own_format else trainer.model,
                       taso_args, out, model_id, tokenizer, metrics)
        write_json(out / "metrics.json", metrics)
        plot_run(metrics, out / "training.png")
        log.info("wrote %s (adapter%s, metrics.json, training.png)", out, ", masks" if own_format else "")
    state.wait_for_everyone()
    return metrics


def _metrics(report, result, cb: MetricsCallback, trainer, base_lr, length_stats, n_train) -> dict:
    train_seconds = cb.seconds or result.metrics.get("train_runtime", 0.0)
    losses = [loss for _, loss in cb.losses]
    return {
        **{k: v for k, v in report.items() if k != "layers"},
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        # From the logged per-step losses: the Trainer's own aggregate differs under DeepSpeed.
        "train_loss_mean": sum(losses) / len(losses) if losses else result.training_loss,
        "loss_curve": cb.losses,
        "eval_loss_curve": cb.eval_losses,
        "train_seconds": train_seconds,
        "train_tokens": cb.num_tokens,
        "tokens_per_second": cb.num_tokens / train_seconds if train_seconds else None,
        "global_steps": result.global_step,
        "base_learning_rate": base_lr,
        "learning_rate": trainer.args.learning_rate,
        "train_rows": n_train,
        "length_policy": length_stats,
        "world_size": trainer.args.world_size,
        **peak_memory_bytes(),
        "layers": report.get("layers", {}),
    }


def _extra_outputs(model, taso_args: TasoArguments, out: Path, model_id: str, tokenizer, metrics: dict) -> None:
    """The PEFT LoRA export and the merged model, when asked for. Merge goes last: it removes the wrappers."""
    from .export import export_peft_lora, merge_adapters

    if taso_args.export_peft and taso_args.method == "taso":
        metrics["peft_export"] = export_peft_lora(model, out / "peft_lora", model_id)
    if taso_args.save_merged:
        merged = merge_adapters(model)
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        metrics["merged_dir"] = str(out / "merged")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
