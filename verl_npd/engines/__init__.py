"""The engines verl-npd lends verl, each with the registration that names it to verl: the ``npd_cpu``
rollout server (``cpu_engine``, ``cpu_server``), the ``npd_gloo`` checkpoint engine, verl's vLLM
replica on vLLM's CPU build (``vllm_cpu``), and patches of verl's vLLM server
(``vllm_prompt_logprobs``, ``vllm_weight_versions``). ``prompt_logprobs`` is what NPD's scoring asks
an engine for and the fields it answers with. Nothing here imports ``rollout/`` or ``trainer/``.
"""
