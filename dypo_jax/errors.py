"""How a run ends other than by finishing: the errors `main` turns into exit statuses.

Light on purpose (no JAX): `main` catches these before it imports anything heavy.
"""
EXIT_ERROR = 1  # Any other error (a traceback).
EXIT_BAD_CONFIG = 2  # The config or an input is invalid: nothing was trained.
EXIT_NOTHING_TO_LEARN = 3  # train.max_empty_updates empty updates in a row; checkpoint saved.
EXIT_NONFINITE = 4  # More than train.max_nonfinite_updates non-finite updates.
EXIT_WORKDIR_LOCKED = 5  # Another live run holds the workdir (workdir/run.lock).
EXIT_PREEMPTED = 75  # SIGTERM / SIGINT: saved; "temporary failure, resume me" (EX_TEMPFAIL).


class NothingToLearn(RuntimeError):
  """`train.max_empty_updates` updates in a row found nothing queued."""


class Preempted(RuntimeError):
  """SIGTERM or SIGINT arrived: the run saved a checkpoint at a step boundary and stopped early."""
