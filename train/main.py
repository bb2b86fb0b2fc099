"""Entry point: ``python -m train.main --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

Re-running the same command on the same DIR resumes from its latest checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from train import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training configuration (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, TensorBoard and QC images")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    parallel.maybe_initialize_distributed()
    from train.train import train_and_evaluate  # after distributed init

    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print({k: v for k, v in summary.items() if k != "val_pairs"})


if __name__ == "__main__":
    app.run(main)
