"""``python -m verl_npd.main_npd``: the near-policy trainer's entry point (see verl_npd/trainer/main_npd.py)."""

from verl_npd.trainer.main_npd import main

if __name__ == "__main__":
    main()
