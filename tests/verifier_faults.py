"""A math-verify score function that misbehaves on request, for `MathVerifyPool`'s fault tests.

A module of its own (not a test file): the pool's spawned workers import it by name, and they
find it on the sys.path the test process hands them.
"""
import logging
import os
import time

from dypo_jax.evaluation import verifier


def fault_injection_score(gold: str, pred: str) -> float:
  """`verifier.math_verify_score`, except pred "HANG" sleeps forever, "CRASH" kills the process
  with os._exit(13), "RAISE" raises, "GIVE_UP" raises VerifierTimeout and "LOG" logs a
  30k-character warning."""
  if pred == "LOG":
    logging.getLogger("math_verify").warning("Timeout during parsing: %s", "x" * 30_000)
    return 0.0
  if pred == "GIVE_UP":
    raise verifier.VerifierTimeout("injected timeout")
  if pred == "HANG":
    while True:
      time.sleep(3600)
  if pred == "CRASH":
    os._exit(13)  # pylint: disable=protected-access
  if pred == "RAISE":
    raise RuntimeError("injected failure")
  return verifier.math_verify_score(gold, pred)
