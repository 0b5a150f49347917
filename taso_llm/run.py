"""One SFT run, start to finish: validate → data → model → trainer → method.prepare → train → outputs.

`recipes/sft_taso.py` parses the argument dataclasses (data, shared method arguments, every method's own prefixed
arguments, SFTConfig, ModelConfig) and calls `run_sft`; everything it does is here, in the order it happens. The
method object decides what to select, attach, save and export: this file never names a method.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from accelerate import PartialState

from .config import MethodArguments, validate_shared_args, validate_training_args
from .data import DataArguments, apply_length_policy, load_sft_splits
from .adapters.io import gathered_adapter_state
from .io import write_json
from .loading import load_model_and_tokenizer, load_tokenizer, target_shapes
from .methods import Method, RunContext, get_method
from .outputs import claim_output_dir, run_settings
from .plots import plot_run
from .preemption import PreemptionCallback
from .sparse.calibration import calibration_batches, num_calibration_batches
from .tiny import resolve_model_path
from .train import MetricsCallback, build_trainer, engine_info, peak_memory_bytes

log = logging.getLogger("taso_llm")


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_main else logging.WARNING)


def _resolve_checkpoint(value):
    """`--resume_from_checkpoint true` means the newest complete checkpoint in output_dir (as in HF examples)."""
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", ""):
        return None
    return value


def method_options(method: Method, method_args: list) -> object | None:
    """The chosen method's own arguments; another method's field set away from its default is an error (it would
    be silently ignored otherwise)."""
    own = None
    for args in method_args:
        if type(args) is method.args_class:
            own = args
            continue
        for f in dataclasses.fields(args):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(args, f.name) != default:
                raise ValueError(f"{f.name}={getattr(args, f.name)!r} is an option of another method; "
                                 f"method={method.name} does not use it")
    if own is None and method.args_class is not None:
        own = method.args_class()
    return own


def run_sft(data_args: DataArguments, shared: MethodArguments, training_args, model_args, *method_args) -> dict:
    state = PartialState()
    setup_logging(state.is_main_process)
    start = time.perf_counter()
    model_id = model_args.model_name_or_path
    method = get_method(shared.method)
    own = method_options(method, list(method_args))
    training_args.resume_from_checkpoint = _resolve_checkpoint(training_args.resume_from_checkpoint)

    # Cheap checks first: arguments, names and shapes from a weightless copy, the output directory, then the data.
    validate_training_args(training_args)
    model_path = resolve_model_path(model_id)
    shapes = target_shapes(model_path, shared.target_modules, model_args.model_revision)
    validate_shared_args(shared, shapes)
    method.validate(shared, own, shapes, model_args)
    # Locked, and refused on every rank if it holds another run's outputs; resume → the newest complete checkpoint.
    settings = run_settings(data_args, shared, training_args, model_args, own)
    outputs = claim_output_dir(Path(training_args.output_dir), settings, shared.overwrite_output_dir,
                               training_args.resume_from_checkpoint, state.is_main_process)
    training_args.resume_from_checkpoint = outputs.checkpoint
    if training_args.resume_from_checkpoint:
        method.resume_check(shared, own, Path(training_args.output_dir))
    # The tokenizer first (cheap): whether it has a chat template decides conversational vs plain prompt/completion rows.
    template = training_args.chat_template_path
    tokenizer = load_tokenizer(model_args, chat_template_path=template)
    splits = load_sft_splits(data_args, seed=training_args.seed, tokenizer=tokenizer)

    model, tokenizer = load_model_and_tokenizer(model_args, chat_template_path=template, tokenizer=tokenizer)
    max_length = training_args.max_length
    train_ds, length_stats = apply_length_policy(splits["train"], tokenizer, max_length, data_args.max_length_policy)
    eval_ds = splits["validation"] if len(splits["validation"]) else None

    metrics_cb = MetricsCallback()
    if training_args.resume_from_checkpoint:
        metrics_cb.resume_from(training_args.resume_from_checkpoint)  # the history so far: curves, report, time
    preemption = PreemptionCallback()  # SIGTERM from here on: a checkpoint at the next step end, then stop
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, training_args, base_model_id=model_id,
                            callbacks=[metrics_cb, preemption])
    ctx = RunContext(
        output_dir=Path(training_args.output_dir), model_id=model_id, model_args=model_args,
        is_main=state.is_main_process, seed=training_args.seed,
        num_calibration_batches=num_calibration_batches(len(trainer.train_dataset), shared.calibration_samples,
                                                        shared.calibration_batch_size),
        calibration=lambda: calibration_batches(  # read lazily: skipped when masks are reused
            trainer.train_dataset, trainer.data_collator, shared.calibration_samples, shared.calibration_batch_size,
            rank=state.process_index, world_size=state.num_processes))
    report = method.prepare(trainer.model, shared, own, ctx)
    for callback in method.callbacks(trainer.model, shared, own):  # e.g. a mask resampled every step
        trainer.add_callback(callback)
    metrics_cb.keep_report(report)
    base_lr = training_args.learning_rate
    trainer.args.learning_rate = base_lr * report.lr_multiplier

    outputs.commit()  # the directory is this run's from here: earlier outputs replaced, masks moved into place
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if preemption.stopped:  # SIGTERM: the checkpoint is all this run leaves, nothing that says "finished"
        stopped = preemption.finish(state.is_main_process)
        outputs.release()
        return stopped
    out, final = Path(training_args.output_dir), outputs.pending  # final files wait in `final` until all are written
    if method.own_adapter_format:
        adapter = gathered_adapter_state(trainer.accelerator.unwrap_model(trainer.model))  # collective: all ranks
        if state.is_main_process:
            method.save(trainer.model, final, shared, own, model_id, state=adapter)
    else:
        trainer.save_model(str(final))
    metrics = {"method": method.name, "model": model_id, **engine_info(trainer),
               **_metrics(result, metrics_cb, trainer, base_lr, length_stats, len(train_ds))}
    if eval_ds is not None:  # every rank: evaluation gathers losses across ranks
        metrics["eval_loss"] = trainer.evaluate().get("eval_loss")
    if state.is_main_process:
        if method.own_adapter_format:
            from .adapters.export import standalone_model

            _extra_outputs(method, standalone_model(trainer.model, final, model_args), shared, final, out, model_id,
                           tokenizer, metrics)
        plot_run(metrics, final / "training.png")
        outputs.publish()
        write_json(out / "metrics.json", metrics)  # last: a metrics.json means a finished run
        log.info("done in %.0f s: method=%s, %d trainable params, final train loss %s; outputs in %s",
                 time.perf_counter() - start, method.name, metrics["trainable_params"],
                 f"{metrics['last_train_loss']:.4f}" if metrics["last_train_loss"] is not None else "n/a", out)
    state.wait_for_everyone()
    outputs.release()
    return metrics


def _metrics(result, cb: MetricsCallback, trainer, base_lr, length_stats, n_train) -> dict:
    train_seconds = cb.seconds or result.metrics.get("train_runtime", 0.0)
    losses = [loss for _, loss in cb.losses]
    return {
        **cb.report["metrics"],
        **({"resumed_from": cb.resumed_from} if cb.resumed_from else {}),
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
        "layers": cb.report["layers"],
    }


def _extra_outputs(method: Method, model, shared: MethodArguments, staging: Path, out: Path, model_id: str,
                   tokenizer, metrics: dict) -> None:
    """The PEFT LoRA export and the merged model, when asked for, written into `staging` (published into `out`
    with the other final files). Merge goes last: it removes the wrappers."""
    if shared.export_peft and method.exports_peft_lora:
        metrics["peft_export"] = method.export_peft(model, staging / "peft_lora", model_id)
    if shared.save_merged:
        merged = method.merge(model)
        merged.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        metrics["merged_dir"] = str(out / "merged")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
