"""One output directory, one run: a lock, the run's identity, refusal of another run's outputs, and outputs that
appear only once they are complete.

Life of `output_dir` in one run (run.py drives it; the main process does the file work, every rank gets its answer):

    claim_output_dir   before any heavy work. Lock `.taso.lock` (a kernel lock: it dies with the process, kill -9
                       included, so it never has to be cleaned up by hand). Decide, from what the directory holds:
                         - nothing of a run's outputs                → a fresh run;
                         - outputs, --resume_from_checkpoint         → the same run continues; its settings must have
                           the fingerprint in run_state.json, and the newest COMPLETE checkpoint is resumed;
                         - outputs, --overwrite_output_dir           → they will be replaced (at commit, not now);
                         - outputs, neither                          → refused, on every rank, naming what is there.
    pending            what the run prepares before it is committed to (the masks) and its final files are written
                       under `.pending/` first.
    commit             when training starts: an overwritten run's outputs are removed (only the names below: other
                       files are left alone), the masks move into place, run_state.json records the fingerprint.
                       A run that fails before this point leaves the earlier outputs as they were (what it
                       had staged stays in .pending/ until the next run into the directory clears it).
    publish            at the end: the final files (adapter, peft_lora/, merged/, training.png, ...) move into place;
                       run.py then writes metrics.json last, so its presence means "finished".

Checkpoints are written under `.partial-checkpoints/checkpoint-N` and renamed to `checkpoint-N` once complete
(train.py); a `checkpoint-N` without its trainer_state.json (written last) is an incomplete one from before that,
skipped on resume and removed when the resumed run commits.

The fingerprint covers the settings that change what is trained (model, data, method, optimisation, seed); not
where or how often things are logged or saved, not the number of processes, not `masks_path` (a resumed run reloads
the masks it committed). Under several nodes `output_dir` must be one shared directory (the main process decides).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .io import write_json

log = logging.getLogger("taso_llm")

LOCK_FILE = ".taso.lock"
RUN_STATE_FILE = "run_state.json"
PENDING_DIR = ".pending"
PARTIAL_CHECKPOINTS = ".partial-checkpoints"
FINISHED_MARK = "metrics.json"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run of this project writes: what counts as "a run's outputs", and all that --overwrite_output_dir removes
# (with run_state.json's list of published names, which covers the Trainer's files for the lora/full methods).
RUN_OUTPUTS = ("masks.safetensors", "adapter_config.json", "adapter_model.safetensors", FINISHED_MARK,
               "training.png", "peft_lora", "merged")
RUN_METADATA = (RUN_STATE_FILE, "README.md")  # removed with the outputs, but no output on their own

# Training arguments that change what is trained (not: logging, saving, evaluation, hub, engine plumbing, activation
# checkpointing, which only trades memory for time).
TRAINING_FIELDS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "optim_target_modules", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "full_determinism",
    "bf16", "fp16", "tf32", "label_smoothing_factor", "max_length", "truncation_mode",
    "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
    "loss_type", "neftune_noise_alpha", "chat_template_path", "eos_token", "pad_token", "use_liger_kernel",
    "average_tokens_across_devices", "shuffle_dataset", "train_sampling_strategy", "dataloader_drop_last",
    "model_init_kwargs", "dataset_kwargs", "pad_to_multiple_of")
# Shared method arguments that only choose extra outputs, or where the masks come from.
NOT_FINGERPRINTED = ("export_peft", "save_merged", "masks_path", "overwrite_output_dir")


class OutputDirError(ValueError):
    """output_dir cannot be used by this run; the message names the directory, what is there and what to do."""


# ------------------------------------------------------------------------------------------- identity of a run

def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def run_settings(data_args, shared, training_args, model_args, own=None) -> dict:
    """The settings that define a run, as plain JSON values, grouped by where they come from."""
    def fields(obj, skip=()):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}

    return {"data": fields(data_args), "method": fields(shared, NOT_FINGERPRINTED),
            "method_options": fields(own) if own is not None else {}, "model": fields(model_args),
            "training": {name: _plain(getattr(training_args, name, None)) for name in TRAINING_FIELDS}}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """`group.field: old → new` for every setting that differs."""
    out = []
    for group in sorted(set(old) | set(new)):
        a, b = old.get(group, {}), new.get(group, {})
        out += [f"{group}.{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


# --------------------------------------------------------------------------------------------------- the lock

_HELD: dict[str, int] = {}  # lock path → open descriptor, for this process


def lock_output_dir(out: Path, note: dict) -> None:
    """Hold an exclusive lock on `out` until release_output_dir or the end of the process. Re-entrant within one
    process (a failed in-process run that left it held). `note` (who, since when, which run) goes into the lock file
    so that a refused run can say who holds it."""
    path = str(out / LOCK_FILE)
    if path in _HELD:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputDirError(f"output_dir {out} is in use by another run (lock {path} held by: {holder}); wait for "
                             "it to finish or choose another output_dir") from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        log.warning("the file system of %s does not support locks (%s): a second run into it would not be "
                    "detected", out, err.strerror)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(note).encode(), 0)
    _HELD[path] = fd


def release_output_dir(out: Path) -> None:
    fd = _HELD.pop(str(Path(out) / LOCK_FILE), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock; the file stays (deleting it would race a new locker)


# --------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if checkpoint_step(path) is None:
        return "not named checkpoint-<step> (a partial save?)"
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE} (written last: the save was cut short)"
    return None


def checkpoints(out: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory in `out`, oldest step first."""
    found = [p for p in Path(out).iterdir() if p.is_dir() and checkpoint_step(p) is not None] if out.is_dir() else []
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(out: Path, resume) -> tuple[str, list[Path]]:
    """The checkpoint to resume from (`resume` is True for the newest complete one in `out`, or a path), and the
    incomplete ones that a resumed run removes."""
    found = checkpoints(out)
    broken = [p for p in found if checkpoint_problem(p)]
    if resume is not True:
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise OutputDirError(f"resume_from_checkpoint={resume!r}: {problem}")
        return str(resume), broken
    complete = [p for p in found if p not in broken]
    skipped = "; ".join(f"{p.name}: {checkpoint_problem(p)}" for p in broken)
    if not complete:
        raise OutputDirError(f"resume_from_checkpoint: no complete checkpoint in {out}"
                             + (f" ({skipped})" if skipped else "")
                             + "; start over with --overwrite_output_dir true")
    for p in broken:
        if checkpoint_step(p) > checkpoint_step(complete[-1]):
            log.warning("skipping %s: %s", p, checkpoint_problem(p))
    return str(complete[-1]), broken


# --------------------------------------------------------------------------------------------------- moving files

def pending_path(final: Path) -> Path:
    """Where a file bound for `final` waits until the run commits or publishes (see the module docstring)."""
    return Path(final).parent / PENDING_DIR / Path(final).name


def move_into_place(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`. A file replaces atomically; a directory cannot (rename refuses a non-empty target),
    so an existing one is first renamed aside and deleted after the new one is in place."""
    if dst.exists() and (src.is_dir() or dst.is_dir()):
        aside = dst.with_name(f".{dst.name}.old")
        _remove(aside)
        os.rename(dst, aside)
        os.rename(src, dst)
        _remove(aside)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_run_state(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / RUN_STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise OutputDirError(f"{Path(out) / RUN_STATE_FILE}: not valid JSON ({err}); delete it if no run owns "
                             "this directory") from None


def run_outputs(out: Path, state: dict | None = None) -> list[str]:
    """Names of a run's outputs present in `out` (see RUN_OUTPUTS), checkpoints included."""
    names = set(RUN_OUTPUTS) | set((state or {}).get("outputs", []))
    present = [n for n in sorted(names) if (out / n).exists()]
    return present + [p.name for p in checkpoints(out)]


# --------------------------------------------------------------------------------------------------- the claim

@dataclass
class OutputDir:
    """This run's claim on its output directory (every rank holds one; the main process does the file work)."""

    out: Path
    fingerprint: str
    settings: dict
    is_main: bool
    checkpoint: str | None = None  # resolved checkpoint to resume from
    replace: list[str] = field(default_factory=list)  # names commit removes: an overwritten run's, broken checkpoints
    published: list[str] = field(default_factory=list)

    @property
    def pending(self) -> Path:
        return self.out / PENDING_DIR

    def commit(self) -> None:
        """Training starts: from here on the directory is this run's. Call on every rank."""
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank is done reading what commit may replace (reused masks)
        if self.is_main:
            if self.replace:
                log.info("replacing in %s: %s", self.out, ", ".join(self.replace))
            for name in self.replace:
                _remove(self.out / name)
            state = read_run_state(self.out) or {}
            self.published = [n for n in state.get("outputs", []) if n not in self.replace]
            self.publish()
        PartialState().wait_for_everyone()

    def publish(self) -> None:
        """Move everything pending into place and record it in run_state.json (main process)."""
        if not self.is_main:
            return
        moved = sorted(p.name for p in self.pending.iterdir()) if self.pending.is_dir() else []
        for name in moved:
            move_into_place(self.pending / name, self.out / name)
        if self.pending.is_dir():
            self.pending.rmdir()
        self.published = sorted(set(self.published) | set(moved))
        write_json(self.out / RUN_STATE_FILE, {"format": "taso-run/1", "fingerprint": self.fingerprint,
                                               "outputs": self.published, "settings": self.settings})

    def release(self) -> None:
        if self.is_main:
            release_output_dir(self.out)


def _decide(out: Path, digest: str, settings: dict, overwrite: bool, resume) -> dict:
    """The main process's decision (under the lock): the checkpoint to resume and what commit replaces."""
    if overwrite and resume:
        raise OutputDirError("overwrite_output_dir and resume_from_checkpoint are both set: choose one (continue "
                             f"the run in {out}, or replace it)")
    for stale in (PENDING_DIR, PARTIAL_CHECKPOINTS):  # left by a run that died; nobody else writes here (locked)
        _remove(out / stale)
    state = read_run_state(out)
    present = run_outputs(out, state)
    if resume:
        if state is None and present:
            log.warning("%s has no %s (written by an older version?): cannot check that the resumed run has the "
                        "same settings", out, RUN_STATE_FILE)
        elif state is not None and state.get("fingerprint") != digest:
            changed = settings_diff(state.get("settings", {}), settings)
            raise OutputDirError(f"resume_from_checkpoint: the run in {out} was trained with other settings ("
                                 f"{'; '.join(changed[:8]) or 'fingerprint ' + str(state.get('fingerprint'))}); "
                                 "resume with the same ones, or start over with --overwrite_output_dir true")
        checkpoint, broken = resolve_checkpoint(out, resume)
        log.info("resuming from %s%s", checkpoint, " (the newest complete checkpoint)" if resume is True else "")
        return {"checkpoint": checkpoint, "replace": [p.name for p in broken]}
    if not present:
        return {"checkpoint": None, "replace": []}
    if overwrite:
        removable = [n for n in (*RUN_METADATA, *(state or {}).get("outputs", [])) if (out / n).exists()]
        return {"checkpoint": None, "replace": sorted(set(present) | set(removable))}
    finished = "a finished run" if FINISHED_MARK in present else "an unfinished run"
    other = state is not None and state.get("fingerprint") != digest
    shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "")
    raise OutputDirError(f"output_dir {out} holds the outputs of {finished}{' with other settings' if other else ''} "
                         f"({shown}): pass --overwrite_output_dir true to replace them, --resume_from_checkpoint true "
                         "to continue that run, or choose another output_dir")


def claim_output_dir(out: Path, settings: dict, overwrite: bool, resume, is_main: bool) -> OutputDir:
    """Lock `out` and decide what this run may do with it (module docstring). Call on every rank before any heavy
    work: the main process decides and every rank gets the same answer, or raises the same OutputDirError."""
    from .distributed import broadcast_from_main

    out = Path(out)
    digest = fingerprint(settings)
    decision: dict = {}
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock_output_dir(out, {"host": socket.gethostname(), "pid": os.getpid(), "fingerprint": digest,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            decision = _decide(out, digest, settings, overwrite, resume)
        except Exception as err:  # every rank must hear of it, or the others wait in the broadcast below
            release_output_dir(out)
            decision = {"error": f"{type(err).__name__}: {err}"}
            broadcast_from_main(decision)
            raise
    decision = broadcast_from_main(decision)
    if "error" in decision:
        raise OutputDirError(f"the main process refused output_dir {out}: {decision['error']}")
    return OutputDir(out, digest, settings, is_main, checkpoint=decision["checkpoint"], replace=decision["replace"])
