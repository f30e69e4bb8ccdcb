"""verl-npd: Near-Policy Distillation for verl.

Importing this package is cheap: it does not import verl, torch or Ray. The registrations with
verl happen in :mod:`verl_npd.plugin`, which verl loads through its ``verl.plugins`` entry point.
"""

__version__ = "0.1.0"
