"""One output directory, one run (taso_llm/outputs.py), in-process through run_sft on the tiny model:

- a directory locked by another process, or holding another run's outputs, is refused before any heavy work and left
  untouched; --overwrite_output_dir replaces only the run's own files, and only once the new run starts training;
- a checkpoint save cut short never gets a checkpoint's name; resume takes the newest complete checkpoint (also past
  a half-written one that has the final name), and the result equals the uninterrupted run;
- a resumed run's metrics.json covers the whole run (curve, importance report), as the uninterrupted one does;
- the model card names the base model.
"""

import errno
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taso_llm.config import sft_parser
from taso_llm.outputs import OutputDirError, fingerprint, run_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "recipes" / "configs" / "tiny" / "instruct_taso.yaml"
# 4 steps, a checkpoint after each (none rotated away), constant LR: small and deterministic.
ARGS = ["--config", str(DEFAULT), "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "10",
        "--logging_steps", "1", "--calibration_samples", "16", "--calibration_batch_size", "8",
        "--per_device_train_batch_size", "4", "--max_length", "64", "--validation_size", "0",
        "--max_train_samples", "64", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--export_peft", "false", "--seed", "5"]


def _args(out: Path, *extra):
    return sft_parser().parse_args_and_config([*ARGS, "--output_dir", str(out), *extra])


def _run(out: Path, *extra) -> dict:
    from taso_llm.run import run_sft

    return run_sft(*_args(out, *extra))


def _snapshot(directory: Path) -> dict:
    """Every file's bytes under `directory`, but the lock (it says who holds the directory) and what a failed run
    had staged in .pending/ (not an output; the next run into the directory clears it)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".taso.lock" and ".pending" not in p.parts}


def _interrupted_copy(full: Path, dst: Path, last_checkpoint: int) -> Path:
    """What a run stopped after its checkpoint `last_checkpoint` leaves behind: run state, masks, checkpoints."""
    dst.mkdir()
    for name in ("run_state.json", "masks.safetensors"):
        if (full / name).is_file():
            shutil.copy(full / name, dst)
    for step in range(1, last_checkpoint + 1):
        shutil.copytree(full / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    return dst


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, _run(out)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail loudly if the run got as far as loading data or weights."""
    import taso_llm.run as run

    def boom(*a, **k):
        raise AssertionError("heavy work started before output_dir was refused")

    monkeypatch.setattr(run, "load_sft_splits", boom)
    monkeypatch.setattr(run, "load_model_and_tokenizer", boom)


def _assert_same_adapter(a: Path, b: Path):
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key  # bit for bit: same seed, data order, optimizer and RNG state


# ------------------------------------------------------------------------------------------------ refusal

def test_directory_locked_by_another_run_is_refused(tmp_path, no_heavy_work):
    """Two runs into one output_dir at once: the second stops before any work, naming who holds the directory."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from taso_llm.outputs import lock_output_dir; "
         "lock_output_dir(Path(sys.argv[1]), {'pid': 'the-other-run'}); print('locked', flush=True); "
         "sys.stdin.read()", str(out)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match="in use by another run.*the-other-run"):
            _run(out)
    finally:
        holder.communicate("", timeout=30)
    assert sorted(p.name for p in out.iterdir()) == [".taso.lock"]


@pytest.mark.parametrize("extra, message", [
    ([], "holds the outputs of a finished run \\("),
    (["--budget", "rank2"], "finished run with other settings"),
])
def test_finished_directory_is_refused_and_left_intact(finished, tmp_path, no_heavy_work, extra, message):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    before = _snapshot(out)
    with pytest.raises(OutputDirError, match=message + ".*--overwrite_output_dir true"):
        _run(out, *extra)
    assert _snapshot(out) == before


def test_resume_with_other_settings_is_refused(finished, tmp_path, no_heavy_work):
    out = _interrupted_copy(finished[0], tmp_path / "run", 2)
    with pytest.raises(OutputDirError, match=r"other settings \(training.learning_rate: 0.003 → 0.01\)"):
        _run(out, "--resume_from_checkpoint", "true", "--learning_rate", "1e-2")


def test_fingerprint_covers_what_is_trained_only(tmp_path):
    from taso_llm.methods import get_method
    from taso_llm.run import method_options

    def digest(*extra):
        data, shared, training, model, *own = _args(tmp_path, *extra)
        return fingerprint(run_settings(data, shared, training, model, method_options(get_method(shared.method), own)))

    base = digest()
    for same in (["--logging_steps", "3"], ["--save_steps", "2"], ["--output_dir", "/elsewhere"],
                 ["--export_peft", "true"], ["--overwrite_output_dir", "true"], ["--gradient_checkpointing", "true"]):
        assert digest(*same) == base, same
    for other in (["--learning_rate", "1e-2"], ["--budget", "rank2"], ["--taso_adapter_rank", "2"],
                  ["--max_steps", "5"], ["--dataset_name", "x.jsonl"], ["--seed", "6"], ["--method", "lora"]):
        assert digest(*other) != base, other


@pytest.mark.parametrize("fail_in", ["prepare", "train"])
def test_overwrite_replaces_the_old_run_only_once_training_starts(finished, tmp_path, monkeypatch, fail_in):
    """A re-run with --overwrite_output_dir that fails before training leaves the finished run as it was; one that
    fails after has removed it (nothing looks finished); one that succeeds leaves only its own outputs, and files
    that are not a run's are never touched."""
    from taso_llm.methods.taso import TasoMethod
    from taso_llm.train import AdapterSFTTrainer

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    target, attribute = (TasoMethod, "prepare") if fail_in == "prepare" else (AdapterSFTTrainer, "train")
    original = getattr(target, attribute)

    def fail(self, *args, **kwargs):
        if fail_in == "prepare":
            original(self, *args, **kwargs)  # masks chosen and written (pending), then the run fails
        raise RuntimeError("simulated failure")

    overwrite = ["--overwrite_output_dir", "true", "--max_steps", "2", "--taso_adapter_rank", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(target, attribute, fail)
        with pytest.raises(RuntimeError, match="simulated failure"):
            _run(out, *overwrite)
    if fail_in == "prepare":
        assert _snapshot(out) == before
    else:
        assert not (out / "metrics.json").exists() and not list(out.glob("checkpoint-*"))
        assert (out / "masks.safetensors").read_bytes() != before["masks.safetensors"]

    metrics = _run(out, *overwrite)
    assert [step for step, _ in metrics["loss_curve"]] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "adapter_config.json").read_text())["modules"] != \
        json.loads((finished[0] / "adapter_config.json").read_text())["modules"]  # rank 2 now, rank 4 before


# ------------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_cut_short_is_not_resumed(finished, tmp_path, monkeypatch, caplog):
    """The disk fills while checkpoint-3 is written: it never appears under its name; resume says it takes
    checkpoint-2 and ends with the uninterrupted run's adapter."""
    from taso_llm.train import AdapterSFTTrainer

    out = tmp_path / "run"
    original = AdapterSFTTrainer._save_rng_state

    def disk_full_at_step_3(self, output_dir):
        if self.state.global_step == 3:  # adapter, optimizer and scheduler are written by now
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(AdapterSFTTrainer, "_save_rng_state", disk_full_at_step_3)
        with pytest.raises(OSError, match="No space left"):
            _run(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    with caplog.at_level(logging.INFO, logger="taso_llm"):
        metrics = _run(out, "--resume_from_checkpoint", "true")
    assert f"resuming from {out / 'checkpoint-2'} (the newest complete checkpoint)" in caplog.text
    assert metrics["resumed_from"] == [str(out / "checkpoint-2")]
    _assert_same_adapter(finished[0], out)


def test_half_written_checkpoint_with_its_final_name_is_skipped(finished, tmp_path, caplog):
    """A checkpoint-3 cut short by a full disk under its final name (as written before checkpoints were staged):
    resume takes checkpoint-2, says why it skipped checkpoint-3, removes it, and reproduces the full run."""
    out = _interrupted_copy(finished[0], tmp_path / "run", 3)
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    weights = out / "checkpoint-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="taso_llm"):
        _run(out, "--resume_from_checkpoint", "true")
    assert "skipping" in caplog.text and "checkpoint-3: no readable trainer_state.json" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # written anew by the resumed run
    _assert_same_adapter(finished[0], out)


def test_resume_without_a_complete_checkpoint_says_so(finished, tmp_path, no_heavy_work):
    out = _interrupted_copy(finished[0], tmp_path / "run", 1)
    (out / "checkpoint-1" / "trainer_state.json").unlink()
    with pytest.raises(OutputDirError, match="no complete checkpoint in .*checkpoint-1: no readable trainer_state"):
        _run(out, "--resume_from_checkpoint", "true")


# ------------------------------------------------------------------------------------------------ history, card

def test_resumed_run_reports_the_whole_run(finished, tmp_path):
    """metrics.json of a run resumed from checkpoint-2 equals the uninterrupted run's: the whole loss curve, first
    loss, tokens and the importance report (captured shares, importance time) of the selection made before."""
    full_dir, full = finished
    out = _interrupted_copy(full_dir, tmp_path / "run", 2)
    resumed = json.loads(json.dumps(_run(out, "--resume_from_checkpoint", "true")))
    full = json.loads(json.dumps(full))  # as metrics.json holds it (lists, not tuples)
    assert resumed == json.loads((out / "metrics.json").read_text())  # what run_sft returns is what it wrote
    for key in ("loss_curve", "first_train_loss", "last_train_loss", "train_loss_mean", "train_tokens", "layers",
                "importance_seconds", "importance_batches", "trainable_params", "lr_multiplier", "global_steps"):
        assert resumed[key] == full[key], key
    assert [step for step, _ in resumed["loss_curve"]] == [1, 2, 3, 4]
    assert all("captured_share" in layer for layer in resumed["layers"].values())
    assert "masks_reused_from" not in resumed and "resumed_from" not in full


def test_model_card_names_the_base_model(finished):
    card = (finished[0] / "README.md").read_text()
    assert "base_model: taso-tiny" in card and "fine-tuned version of [taso-tiny]" in card
    assert "[None]" not in card
