"""`python -m easyep_sglang.plan`: plan GPUs and KV cache for each expert count (the code is in easyep_sglang.checkpoint.capacity)."""

from easyep_sglang.checkpoint.capacity import main

if __name__ == "__main__":
    main()
