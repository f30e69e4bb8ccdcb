"""verl's entry point into verl-npd: registers every verl-npd component with verl's registries.

verl imports this module from ``verl/__init__.py`` (entry-point group ``verl.plugins``) in every
process that imports verl: the driver and every Ray worker. verl swallows plugin import errors at
DEBUG level, so each registration here catches and logs its own failure at WARNING, with the
traceback, and the others still run.
"""

import importlib
import logging
import warnings

logger = logging.getLogger("verl_npd")

# verl/workers/engine/__init__.py warns in every process about each optional engine backend that is
# not installed (megatron, torchtitan, veomni, ...); dozens of identical lines that bury real output.
warnings.filterwarnings("ignore", message=r".* engine is not available: .*", category=UserWarning)

# Each module exposes ``register()``; the order matters only for the platform, which must be in
# place before any other module asks verl for the device name.
REGISTRATION_MODULES = (
    "verl_npd.platform.cpu",
    "verl_npd.platform.verl_patches",
    "verl_npd.rollout.cpu_server",
    "verl_npd.rollout.vllm_prompt_logprobs",
    "verl_npd.rollout.gloo_checkpoint_engine",
    "verl_npd.losses.verl_registration",
)


def register_all() -> dict[str, bool]:
    """Run every registration; return which succeeded. Failures are logged, never raised."""
    results = {}
    for module_name in REGISTRATION_MODULES:
        try:
            importlib.import_module(module_name).register()
            results[module_name] = True
        except Exception:
            logger.warning("verl-npd: registering %s with verl failed", module_name, exc_info=True)
            results[module_name] = False
    return results


REGISTERED = register_all()
