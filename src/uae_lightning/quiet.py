"""Third-party output a user of this package cannot act on, silenced where it arises; imported by every entry point
(training, Unified-Bench, the pipeline CLI) before anything else prints. Each entry was checked against what the
package does:

- Lightning: its cloud-logger tip and accelerator inventory (the run's own log says where it runs); its advice to
  launch with srun (the SLURM launcher does; a login-node run is meant to be local); the skipped validation loop
  (held-out evaluation is the test loop, or the RL stages' val_check_interval, by design) and its echo of
  limit_val_batches / val_check_interval as configured; its note that manual-optimisation checkpoints hold the
  weights after the step (what a resume needs); modules in eval mode at the start of training (the frozen encoder
  tower, reward backbones and reference policy, by design); the max_steps stop (every stage stops there); its own
  internal deprecations (pytree's LeafSpec, torch.distributed.nn's all_gather inside its all_gather).
- torch FSDP2: "returned a view tensor" (a Linear on a 3-d input returns a view of its 2-d product); the warning is
  about in-place ops on a module's output, which the package never does — the FSDP2 tests match one-process
  training to 1e-5.
- diffusers: the note that a model has no float32-only modules to keep.
- Hugging Face's weight-loading progress bars when stderr is not a terminal (a SLURM log, a pipe): one bar per
  checkpoint, a second long, at every start and requeue. In a terminal they stay.
- TensorBoard's event reader: its directory-watcher INFO lines ("Directory watcher advancing", "No path found
  after") each time the run reads its stages' event files to write the cross-stage curves (runner.write_run_curves).
- Hydra: conf/hydra/launcher/submitit_slurm.yaml deliberately shadows the plugin's option of the same name (so the
  plain `hydra/launcher=submitit_slurm` gets our defaults); Hydra still validates it against the plugin's schema and
  warns, in the submitting process and again in each job. Its message starts with a newline, hence the `\s*`.
"""
from __future__ import annotations

import logging
import sys
import warnings

for _message in (r"The `srun` command is available on your system but is not used",
                 r"You passed in a `val_dataloader` but have no `validation_step`",
                 r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
                 r"Found \d+ module\(s\) in eval mode at the start of training",
                 r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                 r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                 r"FSDP2-wrapped module \(\w+\) returned a view tensor",
                 r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema"):
    warnings.filterwarnings("ignore", message=_message)


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages(
    "💡 Tip", "GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped: `max_steps=",
    "`Trainer(limit_val_batches=", "`Trainer(val_check_interval="))
logging.getLogger("tensorboard").setLevel(logging.WARNING)
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    _DropMessages("There are modules in SD3Transformer2DModel that should be kept in float32: []"))


def progress_bars(enabled: bool) -> bool:
    """Whether a loop draws a progress bar: when asked and both output streams are terminals (Lightning's bars write
    to stdout, tqdm's to stderr). In a log file (a SLURM log, a piped run) a bar is a stream of carriage-return lines;
    the run logs a line at each stage's start and end, the bench one a minute."""
    return enabled and sys.stdout.isatty() and sys.stderr.isatty()


def hide_loading_bars() -> None:
    """Hugging Face's and diffusers' loading bars only in a terminal, not in a log file (a SLURM log). Called by the
    modules that load models (runner, bench, pipeline), so the command line's config checks need neither library."""
    if not sys.stderr.isatty():
        import diffusers.utils.logging
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
