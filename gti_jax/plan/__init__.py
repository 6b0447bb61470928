"""``python -m gti_jax.plan``: plan a run's steps on a mesh this machine does not have.

The library is :mod:`gti_jax.plan.build` (compile the trainer's steps on shapes, report,
check the fit), :mod:`gti_jax.plan.hlo` (collectives and loops of a compiled program) and
:mod:`gti_jax.plan.shapes` (named model shapes and accelerators). This package imports
nothing itself, so that the command can start jax with the fake devices it needs.
"""
