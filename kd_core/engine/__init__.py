"""The training engine: teacher, distilled student and CE-only baseline, as resumable phases.

Where things are:

* :mod:`~kd_core.engine.experiment` — :func:`run_experiment`, the phases and the epoch loop;
* :mod:`~kd_core.engine.step` — one optimizer step (forward in the run's precision, loss terms in fp32);
* :mod:`~kd_core.engine.teacher` — the teacher's outputs per step: cached, from the soft-label store, or live;
* :mod:`~kd_core.engine.soft_labels` — augmented epochs' teacher logits stored once, keyed by
  :mod:`~kd_core.engine.soft_label_key` (teacher weights + :func:`soft_label_identity` of the data);
* :mod:`~kd_core.engine.evaluation` — predictions, accuracy/agreement metrics;
* :mod:`~kd_core.engine.checkpoint` — weights files and the identity-checked resumable checkpoint;
* :mod:`~kd_core.engine.callbacks` — CKA at checkpoints and the end-of-run analysis bundle;
* :mod:`~kd_core.engine.distributed` — several devices for one run (DDP ranks started by torchrun);
* :mod:`~kd_core.engine.guard`, :mod:`~kd_core.engine.reporting`, :mod:`~kd_core.engine.precision`.

``run_experiment(config, sink, artifacts_dir)`` reports through a :class:`~kd_core.sink.MetricsSink`,
checks ``stop_requested()`` after every step (cancel) and resumes from ``artifacts_dir/checkpoint.pt``.
"""

from kd_core.engine.callbacks import Callback
from kd_core.engine.checkpoint import CHECKPOINT
from kd_core.engine.errors import CheckpointMismatch, StopRequested, TrainingError
from kd_core.engine.experiment import Experiment, PhaseRun, run_experiment

__all__ = ["CHECKPOINT", "Callback", "CheckpointMismatch", "Experiment", "PhaseRun", "StopRequested", "TrainingError", "run_experiment"]
