"""verl's entry point into verl-npd: registers every verl-npd component with verl's registries.

verl imports this module from ``verl/__init__.py`` (entry-point group ``verl.plugins``) in every
process that imports verl: the driver and every Ray worker. verl swallows plugin import errors at
DEBUG level, so each registration here catches and logs its own failure at WARNING, with the
traceback, and the others still run.
"""

import importlib
import logging

logger = logging.getLogger("verl_npd")

# Each module exposes ``register()`` and imports little: verl is still importing when they run, and
# in a fresh Ray worker so may be the very module a registration names, so none imports a
# component's implementation before verl asks for it (the gloo engine, whose registry holds classes,
# is the one exception; its registration module says why that is safe). The order matters only for
# the platform, which must be in place before any other module asks verl for the device name.
# Installing verl-npd changes nothing for a verl user who selects none of these components: each
# patch acts only on NPD's names (npd_cpu, npd_gloo, the npd_* losses, the npd_micro_batch tensor,
# the cpu platform), where verl would otherwise fail or hang, or (vllm_prompt_logprobs) adds a field
# verl does not read, or (vllm_weight_versions) corrects a field only where verl's value is wrong;
# each module says which.
REGISTRATION_MODULES = (
    "verl_npd.platform.cpu",
    "verl_npd.platform.resource_check",
    "verl_npd.platform.trl_compat",
    "verl_npd.engines.cpu_server_registration",
    "verl_npd.engines.vllm_prompt_logprobs",
    "verl_npd.engines.vllm_weight_versions",
    "verl_npd.engines.gloo_checkpoint_engine_registration",
    "verl_npd.engines.vllm_cpu_registration",
    "verl_npd.rollout.remote_teacher_agent_loop",
    "verl_npd.trainer.packed_micro_batches",
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
